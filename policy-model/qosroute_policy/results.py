"""Markdown tables of evaluations (the JSON files of scripts/evaluate-model.sh).

One model, every policy per scenario:

    python -m qosroute_policy.results policy-model/models/han

Several trained models per variant (training seeds), side by side, with paired gains over
qos-greedy (same workload seed, same scenario):

    python -m qosroute_policy.results --variant HAN=dir1,dir2,dir3 --variant MLP=dir4,dir5,dir6
"""

import argparse
import json
import os

import numpy as np

SCENARIOS = [
    ("paper-light", "paper-3x7b, Poisson 0.5 req/s (light)"),
    ("paper-medium", "paper-3x7b, Poisson 1.5 req/s (medium)"),
    ("paper-overloaded", "paper-3x7b, Poisson 4 req/s (overloaded)"),
    ("edge-trace-x0.5", "edge-mixed, conv trace x0.5"),
    ("edge-trace-x1", "edge-mixed, conv trace x1"),
    ("metro8-heldout-trace-x1", "metro-8x (held out, 8 experts), conv trace x1"),
]


def short(policy):
    return "learned (HAN)" if policy.startswith("han:") else policy


def one_model(model_dir):
    lines = []
    for key, title in SCENARIOS:
        path = os.path.join(model_dir, "eval", f"{key}.json")
        if not os.path.exists(path):
            continue
        summary = json.load(open(path))["summary"]
        best_baseline = max((s for s in summary if not s["policy"].startswith("han:")), key=lambda s: s["avg_qos_mean"])
        lines += [f"**{title}** (3 seeds; best baseline: {best_baseline['policy']})", "",
                  "| policy | avg QoS ± std | SLO miss | reject |", "|---|---|---|---|"]
        for s in summary:
            name = short(s["policy"])
            if s["policy"].startswith("han:"):
                name = f"**{name}**"
            lines.append(f"| {name} | {s['avg_qos_mean']:.4f} ± {s['avg_qos_std']:.4f} | "
                         f"{100 * s['slo_violation_rate_mean']:.1f} % | {100 * s['reject_rate_mean']:.1f} % |")
        lines.append("")
    return "\n".join(lines)


def runs_of(model_dir, key):
    """{policy: {seed: run}} of one scenario; the learned policy is keyed "learned"."""
    out = {}
    for r in json.load(open(os.path.join(model_dir, "eval", f"{key}.json")))["runs"]:
        out.setdefault("learned" if r["policy"].startswith("han:") else r["policy"], {})[r["seed"]] = r
    return out


def variants_table(variants):
    """variants: [(label, [model dirs])]. Average QoS mean ± std over training seeds x workload
    seeds, the SLO-violation rate, and the paired gain over qos-greedy with its win count."""
    labels = [label for label, _ in variants]
    lines = ["| scenario | " + " | ".join(labels) + " | qos-greedy | best other baseline |",
             "|---" * (len(labels) + 3) + "|"]
    gain_lines = ["| scenario | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    all_gains = {label: [] for label in labels}
    for key, title in SCENARIOS:
        cells, gains = [], []
        base = runs_of(variants[0][1][0], key)
        for label, dirs in variants:
            qos, slo, paired = [], [], []
            for d in dirs:
                runs = runs_of(d, key)
                for seed, r in runs["learned"].items():
                    qos.append(r["avg_qos"])
                    slo.append(r["slo_violation_rate"])
                    paired.append(r["avg_qos"] - runs["qos-greedy"][seed]["avg_qos"])
            all_gains[label] += paired
            cells.append(f"{np.mean(qos):.4f} ± {np.std(qos):.4f} ({100 * np.mean(slo):.1f} %)")
            gains.append(f"{np.mean(paired):+.4f} ({sum(g > 0 for g in paired)}/{len(paired)})")
        def summary(policy):
            q = [r["avg_qos"] for r in base[policy].values()]
            s = [r["slo_violation_rate"] for r in base[policy].values()]
            return f"{np.mean(q):.4f} ± {np.std(q):.4f} ({100 * np.mean(s):.1f} %)"
        others = [p for p in base if p not in ("learned", "qos-greedy")]
        best = max(others, key=lambda p: np.mean([r["avg_qos"] for r in base[p].values()]))
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {summary('qos-greedy')} | {best}: {summary(best)} |")
        gain_lines.append(f"| {title} | " + " | ".join(gains) + " |")
    gain_lines.append("| **all six** | " + " | ".join(
        f"**{np.mean(all_gains[label]):+.4f}** ({sum(g > 0 for g in all_gains[label])}/{len(all_gains[label])})" for label in labels) + " |")
    return "\n".join(lines), "\n".join(gain_lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", default="policy-model/models/han")
    p.add_argument("--variant", action="append", default=[], help="LABEL=DIR[,DIR...]")
    a = p.parse_args(argv)
    if not a.variant:
        print(one_model(a.model_dir))
        return
    variants = [(v.split("=", 1)[0], v.split("=", 1)[1].split(",")) for v in a.variant]
    table, gains = variants_table(variants)
    print("Average QoS, mean ± std over training seeds x workload seeds (SLO-violation rate):\n")
    print(table)
    print("\nPaired gain over qos-greedy (same scenario and workload seed), mean (wins/pairs):\n")
    print(gains)


if __name__ == "__main__":
    main()

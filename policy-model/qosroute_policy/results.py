"""Markdown tables of evaluations (the JSON files of scripts/evaluate-model.sh).

The published tables come from `qosroute report` (docs/results/, from its kept JSON); this module
prints the same kind of tables for folders of your own (new models, variants, planner settings)
while you work. Standard deviations are sample ones (ddof = 1), as everywhere in qosroute.

One model, every policy per scenario:

    python -m qosroute_policy.results policy-model/models/han

qos-planner against qos-greedy (and every other policy) over the six scenarios, with paired
differences, and the planner's settings table (compare JSONs of scripts/planner-settings.sh and
the criterion estimates of `cargo bench -p qosroute-core --bench planner`):

    python -m qosroute_policy.results --planner policy-model/models/han
    python -m qosroute_policy.results --settings out/planner-settings

Learned routers on what training never saw (scripts/evaluate-heldout.sh), by variant:

    python -m qosroute_policy.results --heldout out/heldout --variant HAN=dir1,dir2,dir3

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


def is_baseline(policy):
    return not policy.startswith("han:") and not policy.startswith("qos-planner")


def paired(runs, policy, reference="qos-greedy"):
    """Differences of avg QoS and SLO-violation rate with the reference, per workload seed."""
    seeds = sorted(runs[policy])
    return ([runs[policy][k]["avg_qos"] - runs[reference][k]["avg_qos"] for k in seeds],
            [runs[policy][k]["slo_violation_rate"] - runs[reference][k]["slo_violation_rate"] for k in seeds])


def planner_tables(model_dir):
    """Every policy per scenario with its paired gain over qos-greedy, then the planner's
    summary: ratio of mean average QoS to qos-greedy's, paired gain and SLO-violation change."""
    out, summary = [], []
    ratios = []
    for key, title in SCENARIOS:
        path = os.path.join(model_dir, "eval", f"{key}.json")
        if not os.path.exists(path):
            continue
        runs = runs_of(model_dir, key)
        planner = next(p for p in runs if p.startswith("qos-planner"))
        out += [f"**{title}** ({len(runs['qos-greedy'])} workload seeds)", "",
                "| policy | avg QoS ± std | SLO miss | reject | paired gain over qos-greedy (wins) |",
                "|---|---|---|---|---|"]
        for policy, by_seed in runs.items():
            q = [r["avg_qos"] for r in by_seed.values()]
            slo = np.mean([r["slo_violation_rate"] for r in by_seed.values()])
            rej = np.mean([r["reject_rate"] for r in by_seed.values()])
            g, _ = paired(runs, policy)
            name = short(policy) if policy != "learned" else "learned (HAN)"
            if policy == planner:
                name = f"**{name}**"
            gain = "" if policy == "qos-greedy" else f"{np.mean(g):+.4f} ± {np.std(g, ddof=1):.4f} ({sum(x > 0 for x in g)}/{len(g)})"
            out.append(f"| {name} | {np.mean(q):.4f} ± {np.std(q, ddof=1):.4f} | {100 * slo:.1f} % | {100 * rej:.1f} % | {gain} |")
        out.append("")
        g, dslo = paired(runs, planner)
        greedy = np.mean([r["avg_qos"] for r in runs["qos-greedy"].values()])
        mine = np.mean([r["avg_qos"] for r in runs[planner].values()])
        ratios.append(mine / greedy)
        slo_g = 100 * np.mean([r["slo_violation_rate"] for r in runs["qos-greedy"].values()])
        slo_p = 100 * np.mean([r["slo_violation_rate"] for r in runs[planner].values()])
        summary.append(f"| {title} | {greedy:.4f} | {mine:.4f} | {mine / greedy:.3f}x | "
                       f"{np.mean(g):+.4f} ± {np.std(g, ddof=1):.4f} ({sum(x > 0 for x in g)}/{len(g)}) | "
                       f"{slo_g:.1f} % -> {slo_p:.1f} % |")
    head = ["| scenario | qos-greedy | qos-planner | ratio | paired gain (wins) | SLO-violation rate |",
            "|---|---|---|---|---|---|"]
    summary.append(f"| **mean over the {len(ratios)} scenarios** | | | **{np.mean(ratios):.3f}x** | | |")
    return "\n".join(head + summary), "\n".join(out)


def settings_table(directory, criterion="target/criterion/planner_settings_E8_R100"):
    """QoS of qos-planner:k=K,h=H against qos-greedy per scenario (compare JSONs named
    SCENARIO.json holding every setting), and the criterion median decision time at E = 8,
    R = 100."""
    files = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
    scenarios = [f[:-5] for f in files]
    data = {sc: json.load(open(os.path.join(directory, f))) for sc, f in zip(scenarios, files)}
    settings = [s["policy"] for s in data[scenarios[0]]["summary"] if s["policy"].startswith("qos-planner")]
    lines = ["| setting | decision (E = 8, R = 100) | " + " | ".join(f"{sc}: QoS vs qos-greedy" for sc in scenarios) + " |",
             "|---" * (len(scenarios) + 2) + "|"]
    for setting in settings:
        params = dict(kv.split("=") for kv in setting.split(":", 1)[1].split(","))
        est = os.path.join(criterion, f"k{params['k']}", params["h"], "new", "estimates.json")
        t = json.load(open(est))["median"]["point_estimate"] / 1e6 if os.path.exists(est) else float("nan")
        cells = []
        for sc in scenarios:
            # compare runs seed by seed, policy by policy, in the summary's order.
            names = [x["policy"] for x in data[sc]["summary"]]
            runs = {}
            for i, r in enumerate(data[sc]["runs"]):
                runs.setdefault(names[i % len(names)], {})[r["seed"]] = r
            g, _ = paired(runs, setting)
            mine = np.mean([r["avg_qos"] for r in runs[setting].values()])
            greedy = np.mean([r["avg_qos"] for r in runs["qos-greedy"].values()])
            cells.append(f"{mine:.4f} ({mine / greedy:.3f}x; {np.mean(g):+.4f}, {sum(x > 0 for x in g)}/{len(g)})")
        lines.append(f"| k = {params['k']}, h = {params['h']} | {t:.2f} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def one_model(model_dir):
    lines = []
    for key, title in SCENARIOS:
        path = os.path.join(model_dir, "eval", f"{key}.json")
        if not os.path.exists(path):
            continue
        summary = json.load(open(path))["summary"]
        best_baseline = max((s for s in summary if is_baseline(s["policy"])), key=lambda s: s["avg_qos_mean"])
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
            cells.append(f"{np.mean(qos):.4f} ± {np.std(qos, ddof=1):.4f} ({100 * np.mean(slo):.1f} %)")
            gains.append(f"{np.mean(paired):+.4f} ({sum(g > 0 for g in paired)}/{len(paired)})")
        def summary(policy):
            q = [r["avg_qos"] for r in base[policy].values()]
            s = [r["slo_violation_rate"] for r in base[policy].values()]
            return f"{np.mean(q):.4f} ± {np.std(q, ddof=1):.4f} ({100 * np.mean(s):.1f} %)"
        others = [p for p in base if p not in ("learned", "qos-greedy") and is_baseline(p)]
        best = max(others, key=lambda p: np.mean([r["avg_qos"] for r in base[p].values()]))
        lines.append(f"| {title} | " + " | ".join(cells) + f" | {summary('qos-greedy')} | {best}: {summary(best)} |")
        gain_lines.append(f"| {title} | " + " | ".join(gains) + " |")
    gain_lines.append("| **all six** | " + " | ".join(
        f"**{np.mean(all_gains[label]):+.4f}** ({sum(g > 0 for g in all_gains[label])}/{len(all_gains[label])})" for label in labels) + " |")
    return "\n".join(lines), "\n".join(gain_lines)


HELDOUT = [
    ("edge-late-x0.5", "edge-mixed, conv trace last 20 min, x0.5"),
    ("edge-late-x1", "edge-mixed, conv trace last 20 min, x1"),
    ("metro8-late-x1", "metro-8x (held out, 8 experts), last 20 min, x1"),
    ("campus12-late-x1", "campus-12x (held out, 12 experts), last 20 min, x1"),
]


def heldout_runs(directory, key):
    """{policy: {seed: run}} of one held-out scenario; learned routers keyed by their folder."""
    out = {}
    for r in json.load(open(os.path.join(directory, f"{key}.json")))["runs"]:
        policy = r["policy"]
        if policy.startswith("han:"):
            policy = os.path.normpath(os.path.dirname(policy[4:]))
        out.setdefault(policy, {})[r["seed"]] = r
    return out


def spread(values):
    """Mean and standard error."""
    v = np.asarray(values, dtype=float)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else 0.0
    return v.mean(), se


def heldout_tables(directory, variants):
    """variants: [(label, [model dirs])]. Per held-out scenario: average QoS of every variant
    (mean ± std over training seeds x workload seeds), qos-greedy, qos-planner and the best other
    baseline; paired gains over qos-greedy (mean ± standard error, wins); ratios of mean average
    QoS to qos-greedy's and to qos-planner's; SLO-violation change in points."""
    labels = [label for label, _ in variants]
    quality = ["| scenario | " + " | ".join(labels) + " | qos-planner | qos-greedy | best other baseline |",
               "|---" * (len(labels) + 4) + "|"]
    gains = ["| scenario | " + " | ".join(labels) + " | qos-planner |", "|---" * (len(labels) + 2) + "|"]
    ratios = {label: [] for label in labels + ["qos-planner"]}
    to_planner = {label: [] for label in labels}
    slo_change = {label: [] for label in labels + ["qos-planner"]}
    below = {label: [] for label in labels + ["qos-planner"]}
    for key, title in HELDOUT:
        if not os.path.exists(os.path.join(directory, f"{key}.json")):
            continue
        runs = heldout_runs(directory, key)
        greedy = runs["qos-greedy"]
        planner = next(v for p, v in runs.items() if p.startswith("qos-planner"))

        def cell(per_seed_runs):
            q = [r["avg_qos"] for r in per_seed_runs]
            v = [r["slo_violation_rate"] for r in per_seed_runs]
            return f"{np.mean(q):.4f} ± {np.std(q, ddof=1):.4f} ({100 * np.mean(v):.1f} %)", np.mean(q), np.mean(v)

        g_cell, g_q, g_v = cell(greedy.values())
        p_cell, p_q, p_v = cell(planner.values())
        cells, gain_cells = [], []
        for label, dirs in variants:
            mine = [runs[os.path.normpath(d)][seed] for d in dirs for seed in sorted(greedy)]
            paired = [runs[os.path.normpath(d)][seed]["avg_qos"] - greedy[seed]["avg_qos"] for d in dirs for seed in sorted(greedy)]
            text, q, v = cell(mine)
            cells.append(text)
            m, se = spread(paired)
            gain_cells.append(f"{m:+.4f} ± {se:.4f} ({sum(x > 0 for x in paired)}/{len(paired)})")
            ratios[label].append(q / g_q)
            to_planner[label].append(q / p_q)
            slo_change[label].append(100 * (v - g_v))
            below[label].append(m + 2 * se < 0)
        pp = [planner[seed]["avg_qos"] - greedy[seed]["avg_qos"] for seed in sorted(greedy)]
        m, se = spread(pp)
        gain_cells.append(f"{m:+.4f} ± {se:.4f} ({sum(x > 0 for x in pp)}/{len(pp)})")
        ratios["qos-planner"].append(p_q / g_q)
        slo_change["qos-planner"].append(100 * (p_v - g_v))
        below["qos-planner"].append(m + 2 * se < 0)
        others = [p for p in runs if is_baseline(p) and p != "qos-greedy" and not os.path.sep in p]
        best = max(others, key=lambda p: np.mean([r["avg_qos"] for r in runs[p].values()]))
        quality.append(f"| {title} | " + " | ".join(cells) + f" | {p_cell} | {g_cell} | {best}: {cell(runs[best].values())[0]} |")
        gains.append(f"| {title} | " + " | ".join(gain_cells) + " |")
    summary = ["| | " + " | ".join(labels) + " | qos-planner |", "|---" * (len(labels) + 2) + "|",
               "| ratio to qos-greedy, mean over scenarios | " + " | ".join(f"**{np.mean(ratios[l]):.3f}x**" for l in labels)
               + f" | {np.mean(ratios['qos-planner']):.3f}x |",
               "| ratio to qos-planner, mean over scenarios | " + " | ".join(f"{np.mean(to_planner[l]):.3f}x" for l in labels) + " | 1 |",
               "| worst SLO-violation change vs qos-greedy (points) | " + " | ".join(f"{max(slo_change[l]):+.1f}" for l in labels + ["qos-planner"]) + " |",
               "| scenarios below qos-greedy beyond noise (gain + 2 s.e. < 0) | " + " | ".join(str(sum(below[l])) for l in labels + ["qos-planner"]) + " |"]
    return "\n".join(summary), "\n".join(quality), "\n".join(gains)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?", default="policy-model/models/han")
    p.add_argument("--variant", action="append", default=[], help="LABEL=DIR[,DIR...]")
    p.add_argument("--planner", action="store_true", help="qos-planner against qos-greedy")
    p.add_argument("--settings", help="a folder of compare JSONs over planner settings")
    p.add_argument("--criterion", default="target/criterion/planner_settings_E8_R100",
                   help="criterion's folder of the planner settings benchmark")
    p.add_argument("--heldout", help="the folder of scripts/evaluate-heldout.sh (with --variant)")
    a = p.parse_args(argv)
    if a.heldout:
        variants = [(v.split("=", 1)[0], v.split("=", 1)[1].split(",")) for v in a.variant]
        summary, quality, gains = heldout_tables(a.heldout, variants)
        print(summary)
        print("\nAverage QoS, mean ± std over training seeds x workload seeds (SLO-violation rate):\n")
        print(quality)
        print("\nPaired gain over qos-greedy (same scenario and workload seed), mean ± standard error (wins/pairs):\n")
        print(gains)
        return
    if a.settings:
        print(settings_table(a.settings, a.criterion))
        return
    if a.planner:
        summary, tables = planner_tables(a.model_dir)
        print(summary)
        print()
        print(tables)
        return
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

"""Markdown tables of a model's evaluation (the JSON files of scripts/evaluate-model.sh).

    python -m qosroute_policy.results policy-model/models/han
"""

import json
import os
import sys

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


def main(model_dir):
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
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "policy-model/models/han")

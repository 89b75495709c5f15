#!/usr/bin/env bash
# What each setting of qos-planner buys: K in {4, 16, 64} futures by H in {0, 20, 100} sampled
# arrivals, against qos-greedy, 3 workload seeds, on paper-3x7b at capacity (Poisson 1.5 req/s,
# 2,000 requests) and edge-mixed on the first 4,000 requests of the conv trace in real time.
# Writes one compare JSON per scenario into OUT (default out/planner-settings) and prints the
# table with the criterion decision times of `cargo bench -p qosroute-core --bench planner`
# (run it first for the times).
#   bash scripts/planner-settings.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-out/planner-settings}"
mkdir -p "$out"
cargo build --release -q -p qosroute-cli
bin=target/release/qosroute
policies="qos-greedy"
for k in 4 16 64; do
  for h in 0 20 100; do
    policies="$policies,qos-planner:k=$k,h=$h"
  done
done
"$bin" compare --experts configs/experts/paper-3x7b.toml --workload "poisson:rate=1.5,n=2000" \
  --policies "$policies" --seeds 1,2,3 --json "$out/paper-medium.json"
"$bin" compare --experts configs/experts/edge-mixed.toml \
  --workload "trace:data/traces/azure-llm-2023-conv.csv,speed=1,n=4000" \
  --policies "$policies" --seeds 1,2,3 --json "$out/edge-trace-x1-4000.json"
python="$(bash scripts/python-env.sh | tail -n 1)"
(cd policy-model && "$python" -m qosroute_policy.results --settings "../$out" \
  --criterion ../target/criterion/planner_settings_E8_R100)

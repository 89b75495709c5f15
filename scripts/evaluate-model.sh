#!/usr/bin/env bash
# Evaluates a learned router against every baseline on the scenarios of issue 4 (3 seeds):
# paper-3x7b under Poisson at a light, a medium and an overloaded rate; edge-mixed replaying
# the conv trace at two speeds; and the held-out metro-8x catalogue (8 experts, never trained
# on). Writes one compare JSON per scenario into MODEL_DIR/eval/ and prints the tables.
#   bash scripts/evaluate-model.sh policy-model/models/han [router-f32.onnx]
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: evaluate-model.sh MODEL_DIR [ONNX FILE]}"
model="$dir/${2:-router-f32.onnx}"
mkdir -p "$dir/eval"
cargo build --release -q -p qosroute-cli
bin=target/release/qosroute
trace=data/traces/azure-llm-2023-conv.csv
run() {
  local name="$1" experts="$2" workload="$3"
  "$bin" compare --experts "$experts" --workload "$workload" --policies "all,han:$model" \
    --seeds 1,2,3 --json "$dir/eval/$name.json"
}
run paper-light configs/experts/paper-3x7b.toml "poisson:rate=0.5,n=2000"
run paper-medium configs/experts/paper-3x7b.toml "poisson:rate=1.5,n=2000"
run paper-overloaded configs/experts/paper-3x7b.toml "poisson:rate=4,n=2000"
run edge-trace-x0.5 configs/experts/edge-mixed.toml "trace:$trace,speed=0.5"
run edge-trace-x1 configs/experts/edge-mixed.toml "trace:$trace,speed=1"
run metro8-heldout-trace-x1 configs/experts/metro-8x.toml "trace:$trace,speed=1"

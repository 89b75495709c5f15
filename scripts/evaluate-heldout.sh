#!/usr/bin/env bash
# Evaluates learned routers on what training never saw (issue 16), next to every baseline and
# qos-planner, over workload seeds 1-3. Training sees only the conv trace's first 40 minutes and
# the paper-3x7b and edge-mixed profiles; these scenarios replay the trace's last 20 minutes
# (offset 2400 s):
#   edge-late-x0.5    edge-mixed at half the trace's rate
#   edge-late-x1      edge-mixed at the trace's rate
#   metro8-late-x1    metro-8x (held-out catalogue, 8 experts)
#   campus12-late-x1  campus-12x (held-out catalogue, 12 experts)
# Writes one compare JSON per scenario into OUT_DIR; tables come from
#   python -m qosroute_policy.results --heldout OUT_DIR --variant LABEL=DIR,DIR ...
# usage: bash scripts/evaluate-heldout.sh OUT_DIR MODEL_DIR [MODEL_DIR ...]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: evaluate-heldout.sh OUT_DIR MODEL_DIR [MODEL_DIR ...]}"
shift
[ "$#" -ge 1 ] || { echo "evaluate-heldout.sh: name at least one model folder" >&2; exit 2; }
policies="all"
for dir in "$@"; do
  [ -f "$dir/router-f32.onnx" ] || { echo "evaluate-heldout.sh: $dir has no router-f32.onnx" >&2; exit 2; }
  policies="$policies,han:$dir/router-f32.onnx"
done
mkdir -p "$out"
cargo build --release -q -p qosroute-cli
bin=target/release/qosroute
trace=data/traces/azure-llm-2023-conv.csv
run() {
  local name="$1" experts="$2" workload="$3"
  "$bin" compare --experts "$experts" --workload "$workload" --policies "$policies" \
    --seeds 1,2,3 --json "$out/$name.json" > "$out/$name.txt"
  echo "$name: $out/$name.json" >&2
}
run edge-late-x0.5 configs/experts/edge-mixed.toml "trace:$trace,speed=0.5,offset=2400"
run edge-late-x1 configs/experts/edge-mixed.toml "trace:$trace,speed=1,offset=2400"
run metro8-late-x1 configs/experts/metro-8x.toml "trace:$trace,speed=1,offset=2400"
run campus12-late-x1 configs/experts/campus-12x.toml "trace:$trace,speed=1,offset=2400"

#!/usr/bin/env bash
# Trains the learned router and its ablations over three training seeds (issue 16), two runs
# at a time (one torch thread and one simulator thread each), then evaluates all of them on
# the held-out scenarios of scripts/evaluate-heldout.sh and prints the tables.
#   han         the shipped recipe: DAgger on qos-planner:k=64, then PPO fine-tuning
#   mlp         the same recipe, an MLP over flat features (means over real nodes only)
#   no-impact   the same recipe, the reward without the impact estimator's penalty
#   ppo-alone   no teacher: PPO from scratch, as many environment steps as the recipe (49,152)
# usage: bash scripts/train-variants.sh OUT_DIR [SEEDS (default 1,2,3)]
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: train-variants.sh OUT_DIR [SEEDS]}"
seeds="${2:-1,2,3}"
python="$(bash scripts/python-env.sh)"
mkdir -p "$out"
train() {
  local name="$1" seed="$2"
  shift 2
  [ -f "$out/$name-s$seed/router-f32.onnx" ] && return 0
  PYTHONPATH=policy-model OMP_NUM_THREADS=1 "$python" -m qosroute_policy.train --seed "$seed" \
    --env-threads 1 --out "$out/$name-s$seed" "$@" > "$out/$name-s$seed.log" 2>&1
  echo "trained $out/$name-s$seed" >&2
}
jobs_list=()
for seed in ${seeds//,/ }; do
  jobs_list+=("han $seed" "mlp $seed --arch mlp" "no-impact $seed --impact-penalty false"
              "ppo-alone $seed --teacher none --total-steps 49152")
done
running=0
for job in "${jobs_list[@]}"; do
  # shellcheck disable=SC2086
  train $job &
  running=$((running + 1))
  if [ "$running" -ge 2 ]; then wait -n; running=$((running - 1)); fi
done
wait
dirs() { local v="$1"; local list=(); for s in ${seeds//,/ }; do list+=("$out/$v-s$s"); done; (IFS=,; echo "${list[*]}"); }
models=()
for v in han mlp no-impact ppo-alone; do for s in ${seeds//,/ }; do models+=("$out/$v-s$s"); done; done
bash scripts/evaluate-heldout.sh "$out/heldout" "${models[@]}"
PYTHONPATH=policy-model "$python" -m qosroute_policy.results --heldout "$out/heldout" \
  --variant "HAN=$(dirs han)" --variant "MLP=$(dirs mlp)" \
  --variant "no impact penalty=$(dirs no-impact)" --variant "PPO alone=$(dirs ppo-alone)"

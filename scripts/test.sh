#!/usr/bin/env bash
# Every test of the project: the Rust workspace (nextest) and the policy trainer (pytest,
# against the Rust simulator extension). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
python="$(bash scripts/python-env.sh | tail -n 1)"
# The daemon's end-to-end tests run a real mosquitto broker.
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  echo "installing mosquitto (the daemon's tests start a real broker)" >&2
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get install -y mosquitto >/dev/null 2>&1 \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y mosquitto >/dev/null; }
fi
cargo nextest run --workspace --locked --no-fail-fast
# One torch thread: torch's OpenMP collapses when another process shares the CPU.
OMP_NUM_THREADS=1 "$python" -m pytest -q policy-model/tests

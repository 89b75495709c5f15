#!/usr/bin/env bash
# Every test of the project: the Rust workspace (nextest) and the policy trainer (pytest,
# against the Rust simulator extension). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
python="$(bash scripts/python-env.sh | tail -n 1)"
# The daemon's end-to-end tests and the hardware-in-loop suite run a real mosquitto broker.
bash scripts/need-mosquitto.sh
cargo nextest run --workspace --locked --no-fail-fast
# One torch thread: torch's OpenMP collapses when another process shares the CPU.
OMP_NUM_THREADS=1 "$python" -m pytest -q policy-model/tests
# The device clients (Python, and the C example on libmosquitto) against the real qosrouted,
# mosquitto and emulated experts (about 10 s).
# The workspace's binaries, as nextest built them (same features: nothing to rebuild).
cargo build --locked -q --workspace --bins
"$python" -m pytest -q clients/python/tests

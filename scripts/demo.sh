#!/usr/bin/env bash
# The README's main job: the whole system on this machine in a few minutes.
# An embedded MQTT broker (rumqttd), the six edge-mixed experts emulated in-process, the real
# qosrouted and simulated MQTT devices replaying the Azure conversation trace (minutes 40-43,
# after the training window), once per router: han, qos-planner, qos-greedy, least-loaded.
# Arguments go to `qosroute demo` (e.g. --seeds 1,2,3, or --policy least-loaded). Run from
# anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p qosroute-daemon -p qosroute-cli
exec "${CARGO_TARGET_DIR:-target}/release/qosroute" demo "$@"

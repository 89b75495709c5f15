#!/usr/bin/env bash
# The README's main job: the whole system on this machine in about a minute and a half.
# An embedded MQTT broker (rumqttd), the six edge-mixed experts emulated in-process, the real
# qosrouted and simulated MQTT devices replaying the Azure conversation trace, once per router.
# Arguments go to `qosroute demo` (default: --compare han,qos-greedy). Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p qosroute-daemon -p qosroute-cli
if [ "$#" -eq 0 ]; then set -- --compare han,qos-greedy; fi
exec "${CARGO_TARGET_DIR:-target}/release/qosroute" demo "$@"

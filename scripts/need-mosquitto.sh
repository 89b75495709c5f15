#!/usr/bin/env bash
# Installs the mosquitto broker (Debian's package) when it is missing: the daemon's tests, the
# hardware-in-loop suite and `qosroute demo` run a real broker. Run from anywhere.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
echo "installing mosquitto (a real MQTT broker for the gateway)" >&2
if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get install -y mosquitto >/dev/null 2>&1 \
  || { $sudo apt-get update >/dev/null && $sudo apt-get install -y mosquitto >/dev/null; }

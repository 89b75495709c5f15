#!/usr/bin/env bash
# Installs the mosquitto broker, its command-line clients and libmosquitto's headers (Debian's
# packages) when missing:
# the daemon's tests, the hardware-in-loop suite (which also publishes with mosquitto_pub and
# reads with mosquitto_sub) and `qosroute demo` run a real broker. Run from anywhere.
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 && command -v mosquitto_sub >/dev/null 2>&1 \
  || need+=(mosquitto-clients)
# The C device example (clients/c) builds on libmosquitto.
[ -f /usr/include/mosquitto.h ] || need+=(libmosquitto-dev)
command -v make >/dev/null 2>&1 || need+=(make)
command -v cc >/dev/null 2>&1 || need+=(gcc)
if [ "${#need[@]}" = 0 ]; then
  exit 0
fi
echo "installing ${need[*]} (a real MQTT broker and clients for the gateway)" >&2
if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
$sudo apt-get install -y "${need[@]}" >/dev/null 2>&1 \
  || { $sudo apt-get update >/dev/null && $sudo apt-get install -y "${need[@]}" >/dev/null; }

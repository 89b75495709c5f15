#!/usr/bin/env bash
# Prepares the Python environment of policy-model/: a virtualenv outside the clone (reused when
# present; QOSROUTE_VENV overrides its place), the pinned requirements, and the simulator
# extension built by maturin. Prints the venv's python on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${QOSROUTE_VENV:-$HOME/.cache/qosroute-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" >&2
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r policy-model/requirements.txt >&2
# The device client's tests (clients/python) run on paho-mqtt, the MQTT library of IoT Python.
"$venv/bin/pip" install -q --disable-pip-version-check paho-mqtt==2.2.0 >&2
VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" \
  "$venv/bin/maturin" develop --release -q -m policy-model/simenv/Cargo.toml >&2
echo "$venv/bin/python"

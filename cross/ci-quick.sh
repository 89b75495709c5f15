#!/usr/bin/env bash
# The reduced board checks every CI run makes (cross/ci.sh is the full set: an aarch64 build
# with fat LTO and the daemon's unit tests under qemu take 25-55 min each from a cold cache
# on 2 cores, more than a CI run on a new machine can spend):
#
#   1. `qosrouted --check-config` of configs/{dev,rpi5,jetson-orin}.toml with the host binary
#      (the board configs' model folder, /usr/share/qosroute/models/han as the .deb installs
#      it, pointed at the repository's copy);
#   2. `systemd-analyze verify` of systemd/qosrouted.service and its `security` exposure
#      score (must be OK or better), skipped with a message where systemd-analyze cannot be
#      installed.
#
#   cross/ci-quick.sh [QOSROUTED]     (default: $CARGO_TARGET_DIR/debug/qosrouted, built if missing)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
bin="${1:-$CARGO_TARGET_DIR/debug/qosrouted}"
if [ ! -x "$bin" ]; then
    cargo build --locked -p qosroute-daemon --bin qosrouted
fi
scratch="$(mktemp -d "${TMPDIR:-/tmp}/qosroute-ci-quick.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
fail() { echo "cross/ci-quick.sh: FAIL: $*" >&2; exit 1; }

echo "== board configurations: --check-config"
"$bin" --check-config configs/dev.toml || fail "configs/dev.toml"
for c in jetson-orin rpi5; do
    sed "s|/usr/share/qosroute/models/|$repo/policy-model/models/|g" "configs/$c.toml" > "$scratch/$c.toml"
    "$bin" --check-config "$scratch/$c.toml" || fail "configs/$c.toml"
done

echo "== systemd unit: verify and exposure score"
if ! command -v systemd-analyze >/dev/null; then
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq systemd >/dev/null 2>&1 \
        || { $sudo apt-get update -qq >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq systemd >/dev/null 2>&1; } \
        || true
fi
if command -v systemd-analyze >/dev/null; then
    # verify resolves ExecStart= on this host: point it at the host binary.
    sed "s|/usr/bin/qosrouted|$bin|g" systemd/qosrouted.service > "$scratch/qosrouted.service"
    systemd-analyze verify "$scratch/qosrouted.service" > "$scratch/verify.txt" 2>&1 || true
    cat "$scratch/verify.txt"
    ! grep -v "Failed to prepare filename" "$scratch/verify.txt" | grep -q . \
        || fail "systemd-analyze verify reported problems"
    systemd-analyze security --offline=yes --no-pager systemd/qosrouted.service \
        > "$scratch/security.txt" 2>&1 || true
    score=$(grep "Overall exposure level" "$scratch/security.txt" || true)
    [ -n "$score" ] || { cat "$scratch/security.txt"; fail "no exposure score"; }
    echo "$score"
    echo "$score" | grep -q -E " (SAFE|OK) " || fail "exposure level worse than OK"
else
    echo "cross/ci-quick.sh: SKIP systemd-analyze verify/security: systemd-analyze is not installable here"
fi
echo "cross/ci-quick.sh: PASS"

#!/usr/bin/env bash
# The reduced board checks every CI run makes (cross/ci.sh is the full set: the fat-LTO board
# build and the daemon's unit tests under qemu take 25-55 min each from a cold cache on a
# loaded 2-core host):
#
#   1. `qosrouted --check-config` of configs/{dev,rpi5,jetson-orin}.toml with the host binary
#      (the board configs' model folder, /usr/share/qosroute/models/han as the .deb installs
#      it, pointed at the repository's copy);
#   2. `systemd-analyze verify` of systemd/qosrouted.service and its `security` exposure
#      score (must be OK or better), skipped with a message where systemd-analyze cannot be
#      installed;
#   3. the HIL smoke scenario under qemu-aarch64 (cross/hil.sh) with qosrouted built for
#      aarch64-unknown-linux-gnu in the dev profile (cargo-zigbuild, glibc 2.27): 143 s cold
#      on this host, seconds warm; the HIL run about a minute. The board profile's fat LTO is
#      what makes the full set slow; the smoke needs a binary for the board's CPU and libc,
#      not its size;
#   4. the daemon crate's unit tests (lib + bin) for aarch64 under qemu-aarch64, linked with
#      Debian's cross gcc (installed when missing): 114 s cold here, 26 tests in 0.4 s.
#   (--no-board-smoke skips 3 and 4.)
#
#   cross/ci-quick.sh [QOSROUTED] [--no-board-smoke]
#       QOSROUTED: the host daemon (default $CARGO_TARGET_DIR/debug/qosrouted, built if missing);
#       the x86-64 qosroute CLI for the emulated experts is $CARGO_TARGET_DIR/debug/qosroute
#       (built if missing).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
board_smoke=1
args=()
for a in "$@"; do
    case "$a" in
        --no-board-smoke) board_smoke=0 ;;
        *) args+=("$a") ;;
    esac
done
bin="${args[0]:-$CARGO_TARGET_DIR/debug/qosrouted}"
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
if [ "$board_smoke" = 1 ]; then
    echo "== HIL smoke of qosrouted for aarch64 (dev profile) under qemu-aarch64"
    cli="$CARGO_TARGET_DIR/debug/qosroute"
    [ -x "$cli" ] || cargo build --locked -q -p qosroute-cli --bin qosroute
    # hil.sh builds the daemon with cross/build.sh (which prints the build time).
    HIL_CLI="$cli" cross/hil.sh --target aarch64-unknown-linux-gnu --profile dev \
        || fail "HIL smoke under qemu"
    echo "== the daemon's unit tests for aarch64 under qemu-aarch64"
    cross/unit-tests.sh || fail "the aarch64 unit tests"
fi
echo "cross/ci-quick.sh: PASS"

#!/usr/bin/env bash
# The daemon crate's unit tests (lib + bin) for aarch64-unknown-linux-gnu, run under
# qemu-aarch64. Debian's cross gcc links them (they run against Debian's arm64 libc under
# qemu, so the glibc floor of the board build does not matter here); no debug info (a third of
# the build time and disk; the tests only need pass or fail). Installs the cross gcc, the arm64
# libc and qemu-user when missing. Used by cross/ci.sh and cross/ci-quick.sh.
#
#   cross/unit-tests.sh
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
target=aarch64-unknown-linux-gnu

missing=()
for p in gcc-aarch64-linux-gnu libc6-arm64-cross qemu-user; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup target add "$target" >/dev/null 2>&1 || true

out="$(mktemp "${TMPDIR:-/tmp}/qosroute-unit-tests.XXXXXX")"
trap 'rm -f "$out"' EXIT
start=$(date +%s)
CARGO_PROFILE_DEV_DEBUG=0 \
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc \
CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc \
AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar \
CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu" \
    cargo test --locked -p qosroute-daemon --target "$target" --lib --bins 2>&1 | tee "$out"
grep -q "^test result: ok" "$out" || { echo "cross/unit-tests.sh: FAIL: no passing test result" >&2; exit 1; }
! grep -q "^test result: FAILED" "$out" || { echo "cross/unit-tests.sh: FAIL: a test failed" >&2; exit 1; }
echo "cross/unit-tests.sh: PASS ($target under qemu, $(( $(date +%s) - start )) s)"

#!/usr/bin/env bash
# The board checks CI runs (issue 7), in one script that installs what it needs:
#
#   1. qosrouted for aarch64-unknown-linux-gnu, board profile, glibc floor 2.27 (cross/build.sh)
#   2. the daemon crate's unit tests (lib + bin) for aarch64 under qemu-aarch64
#   3. the HIL smoke scenario under qemu (cross/hil.sh with the release binary)
#   4. systemd: `systemd-analyze verify` of the unit and its `security` exposure score
#   5. the .deb (cargo-deb), unpacked with `dpkg -x` into a scratch root, files checked
#   6. `qosrouted --check-config` of configs/{dev,rpi5,jetson-orin}.toml (aarch64 binary
#      under qemu; the board configs against the unpacked .deb, where their model lives)
#
#   cross/ci.sh [--skip-tests] [--skip-hil] [--no-build]
#
# --no-build: use the board binary already in $CARGO_TARGET_DIR (built by an earlier job).
#
# Skips (with a message) only what cannot run here: `systemd-analyze` missing and not
# installable. Everything else failing fails the script. Prints the time of each step.
set -euo pipefail

skip_tests=0
skip_hil=0
no_build=0
for a in "$@"; do
    case "$a" in
        --skip-tests) skip_tests=1 ;;
        --skip-hil) skip_hil=1 ;;
        --no-build) no_build=1 ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "cross/ci.sh: unknown argument $a" >&2; exit 2 ;;
    esac
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
target=aarch64-unknown-linux-gnu
bin="$CARGO_TARGET_DIR/$target/board/qosrouted"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/qosroute-ci.XXXXXX")"
t0=$(date +%s)
step_start=$t0
step() { local now; now=$(date +%s); echo "=== [$((now - step_start)) s] done; now: $* (total $((now - t0)) s)"; step_start=$now; }
fail() { echo "cross/ci.sh: FAIL: $*" >&2; exit 1; }

# --- 0. tools ---------------------------------------------------------------------------------------
step "tools"
pkgs=(qemu-user mosquitto mosquitto-clients binutils-aarch64-linux-gnu libc6-arm64-cross
      gcc-aarch64-linux-gnu dpkg-dev curl python3 python3-pip)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
command -v systemd-analyze >/dev/null || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    echo "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null \
        || echo "cross/ci.sh: some packages could not be installed; the steps needing them will say so"
fi
command -v cargo-deb >/dev/null || cargo install --locked cargo-deb
# cross/build.sh installs ziglang and cargo-zigbuild itself.

# --- 1. build ------------------------------------------------------------------------------------------
step "1. qosrouted $target (board profile)"
# build.sh fails when the binary needs a glibc above the floor (2.27).
if [ "$no_build" = 0 ]; then
    cross/build.sh "$target" --release
else
    [ -x "$bin" ] || fail "--no-build: no binary at $bin"
    max=$(readelf --dyn-syms -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
    echo "prebuilt $bin: $(stat -c %s "$bin") bytes, newest GLIBC_$max"
    [ "$(printf '%s\n2.27\n' "$max" | sort -V | tail -n1)" = 2.27 ] || fail "needs GLIBC_$max > 2.27"
fi

# --- 2. unit tests under qemu --------------------------------------------------------------------
if [ "$skip_tests" = 0 ]; then
    step "2. daemon unit tests for $target under qemu-aarch64"
    cross/unit-tests.sh || fail "the aarch64 unit tests"
else
    step "2. (unit tests skipped: --skip-tests)"
fi

# --- 3. HIL under qemu ---------------------------------------------------------------------------------
if [ "$skip_hil" = 0 ]; then
    step "3. HIL smoke under qemu-aarch64"
    cross/hil.sh --target "$target" --bin "$bin"
else
    step "3. (HIL skipped: --skip-hil)"
fi

# --- 4. systemd ------------------------------------------------------------------------------------
step "4. systemd unit"
# --- 5. .deb (built first: verify runs against the unpacked package, binary included)
deb_out="$scratch/deb"
mkdir -p "$deb_out"
cargo deb --locked -p qosroute-daemon --target "$target" --profile board --no-build --no-strip \
    --output "$deb_out" >/dev/null
deb="$(ls "$deb_out"/qosrouted_*_arm64.deb)"
root="$scratch/root"
dpkg -x "$deb" "$root"
if command -v systemd-analyze >/dev/null; then
    unit="$root/lib/systemd/system/qosrouted.service"
    [ -f "$unit" ] || unit="$root/usr/lib/systemd/system/qosrouted.service"
    [ -f "$unit" ] || fail "the .deb has no qosrouted.service"
    # verify resolves ExecStart= on this host: point it at the unpacked (aarch64) binary.
    sed "s|/usr/bin/qosrouted|$root/usr/bin/qosrouted|g" "$unit" > "$scratch/qosrouted.service"
    systemd-analyze verify "$scratch/qosrouted.service" 2>&1 | tee "$scratch/verify.txt"
    ! grep -v "is not executable\|Failed to prepare filename" "$scratch/verify.txt" | grep -q . \
        || fail "systemd-analyze verify reported problems"
    systemd-analyze security --offline=yes --no-pager "$unit" > "$scratch/security.txt" 2>&1 || true
    score_line=$(grep "Overall exposure level" "$scratch/security.txt" || true)
    [ -n "$score_line" ] || { cat "$scratch/security.txt"; fail "no exposure score"; }
    echo "$score_line"
    echo "$score_line" | grep -q -E " (SAFE|OK) " || fail "exposure level worse than OK"
else
    echo "cross/ci.sh: SKIP systemd-analyze verify/security: systemd-analyze not available here"
fi

step "5. .deb contents"
dpkg-deb -I "$deb" | sed -n '/Package:/,/Description:/p'
for f in usr/bin/qosrouted etc/qosroute/qosrouted.example.toml usr/lib/sysusers.d/qosrouted.conf \
         usr/share/qosroute/configs/jetson-orin.toml usr/share/qosroute/configs/rpi5.toml \
         usr/share/qosroute/configs/dev.toml usr/share/qosroute/models/han/router-f32.onnx \
         usr/share/qosroute/models/han/router-int8.onnx; do
    [ -e "$root/$f" ] || fail "the .deb lacks /$f"
done
{ [ -f "$root/lib/systemd/system/qosrouted.service" ] || [ -f "$root/usr/lib/systemd/system/qosrouted.service" ]; } \
    || fail "the .deb lacks the unit"
dpkg-deb -e "$deb" "$scratch/control"
grep -q systemd-sysusers "$scratch/control/postinst" || fail "postinst does not create the user"
grep -q deb-systemd-helper "$scratch/control/postinst" || fail "postinst does not register the unit"
echo "$(basename "$deb"): $(stat -c %s "$deb") bytes; unpacked files:"
(cd "$root" && find . -type f | sort)

# --- 6. configurations ---------------------------------------------------------------------------------
step "6. --check-config of the board configurations"
qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
"${qemu[@]}" "$bin" --check-config configs/dev.toml
for c in jetson-orin rpi5; do
    # As installed: the model the config names lives in the .deb.
    sed "s|/usr/share/qosroute/|$root/usr/share/qosroute/|g" "configs/$c.toml" > "$scratch/$c.toml"
    "${qemu[@]}" "$bin" --check-config "$scratch/$c.toml"
done

step "end"
echo "cross/ci.sh: PASS in $(( $(date +%s) - t0 )) s (scratch: $scratch)"

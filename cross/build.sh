#!/usr/bin/env bash
# Cross-builds `qosrouted` (only the daemon: the workstation tools stay on x86-64) for a board,
# without a container engine.
#
#   cross/build.sh TARGET [--release | --profile NAME] [--linker zig|gcc] [--no-install]
#
# --release builds with the `board` profile of the root Cargo.toml (release + opt-level "s", fat LTO,
#   codegen-units = 1, strip; see cross/README.md for the measurements behind it);
#   --profile release gives the plain release profile; without either: dev.
#
# TARGET: aarch64-unknown-linux-gnu   (Jetson JetPack 4-6, Pi 4/5 64-bit)
#         armv7-unknown-linux-gnueabihf (32-bit Raspberry Pi OS)
#         aarch64-unknown-linux-musl  (static, any aarch64 Linux)
#
# --linker zig (default): cargo-zigbuild with zig from the `ziglang` PyPI package. It links
#   the gnu targets against a pinned glibc: GLIBC_FLOOR_AARCH64 and GLIBC_FLOOR_ARMV7, both
#   2.27 by default (JetPack 4 / Ubuntu 18.04; Raspberry Pi OS buster has 2.28). The .deb
#   declares `libc6 (>= 2.27)`: raise both together.
# --linker gcc: Debian's cross gcc (gcc-aarch64-linux-gnu, gcc-arm-linux-gnueabihf). The result
#   needs the glibc of the build host (Debian 12: 2.36), too new for JetPack 4/5 (2.27/2.31).
#   Not for the musl target.
# --no-install: fail instead of installing what is missing (rustup target, apt packages,
#   ziglang, cargo-zigbuild).
#
# Output: $CARGO_TARGET_DIR/TARGET/PROFILE/qosrouted (PROFILE: board, release or debug) (CARGO_TARGET_DIR defaults to ./target).
# It prints the file size, the stripped size, and for gnu targets the newest GLIBC_ symbol
# version the binary needs (readelf), and fails if that is above the floor asked for.
set -euo pipefail

die() { echo "cross/build.sh: $*" >&2; exit 1; }
log() { echo "cross/build.sh: $*" >&2; }

target=""
profile="dev"
linker="zig"
install=1
while [ $# -gt 0 ]; do
    case "$1" in
        --release) profile="board" ;;
        --profile) shift; profile="${1:?--profile needs a name}" ;;
        --linker) shift; linker="${1:?--linker needs zig or gcc}" ;;
        --no-install) install=0 ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        -*) die "unknown option $1" ;;
        *) [ -z "$target" ] || die "one target only"; target="$1" ;;
    esac
    shift
done
[ -n "$target" ] || die "usage: cross/build.sh TARGET [--release|--profile NAME] [--linker zig|gcc]"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
profile_dir="$profile"
[ "$profile" = "dev" ] && profile_dir="debug"

case "$target" in
    aarch64-unknown-linux-gnu) gcc_pkg=gcc-aarch64-linux-gnu; gcc=aarch64-linux-gnu-gcc
        floor="${GLIBC_FLOOR_AARCH64:-2.27}" ;;
    armv7-unknown-linux-gnueabihf) gcc_pkg=gcc-arm-linux-gnueabihf; gcc=arm-linux-gnueabihf-gcc
        floor="${GLIBC_FLOOR_ARMV7:-2.27}" ;;
    aarch64-unknown-linux-musl) gcc_pkg=""; gcc=""; floor=""
        [ "$linker" = zig ] || die "$target is built with --linker zig only" ;;
    *) die "unsupported target $target (aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf, aarch64-unknown-linux-musl)" ;;
esac

need_apt() { # package...
    local missing=()
    for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$install" = 1 ] || die "missing Debian packages: ${missing[*]}"
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    log "installing ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

# 1. The Rust target.
if command -v rustup >/dev/null; then
    if ! rustup target list --installed | grep -qx "$target"; then
        [ "$install" = 1 ] || die "rustup target $target not installed"
        rustup target add "$target"
    fi
fi

# 2. The linker.
cargo_build=(cargo build)
zig_target="$target"
case "$linker" in
    zig)
        # A venv of our own when the system Python refuses packages (PEP 668, Debian's);
        # cargo-zigbuild runs `python3 -m ziglang`, so its bin goes first on PATH.
        zig_venv="${QOSROUTE_ZIG_VENV:-$HOME/.cache/qosroute-zig-venv}"
        [ -x "$zig_venv/bin/python3" ] && export PATH="$zig_venv/bin:$PATH"
        if ! command -v zig >/dev/null && ! python3 -m ziglang version >/dev/null 2>&1; then
            [ "$install" = 1 ] || die "zig not found (pip install ziglang)"
            log "installing zig from PyPI (ziglang)"
            if ! python3 -m pip install --quiet ziglang 2>/dev/null; then
                log "the system Python refuses packages: installing ziglang into $zig_venv"
                python3 -m venv "$zig_venv"
                "$zig_venv/bin/pip" install --quiet ziglang
                export PATH="$zig_venv/bin:$PATH"
            fi
        fi
        if ! command -v cargo-zigbuild >/dev/null; then
            [ "$install" = 1 ] || die "cargo-zigbuild not found (cargo install --locked cargo-zigbuild)"
            cargo install --locked cargo-zigbuild
        fi
        cargo_build=(cargo zigbuild)
        [ -n "$floor" ] && zig_target="$target.$floor"
        ;;
    gcc)
        need_apt "$gcc_pkg"
        upper="$(echo "$target" | tr 'a-z-' 'A-Z_')"
        lower="$(echo "$target" | tr '-' '_')"
        export "CARGO_TARGET_${upper}_LINKER=$gcc"
        export "CC_${lower}=$gcc"
        export "AR_${lower}=${gcc%-gcc}-ar"
        ;;
    *) die "--linker zig or gcc" ;;
esac

# 3. Build.
log "building qosrouted for $zig_target ($profile, $linker) into $CARGO_TARGET_DIR"
start=$(date +%s)
"${cargo_build[@]}" --locked -p qosroute-daemon --bin qosrouted --target "$zig_target" --profile "$profile"
end=$(date +%s)
bin="$CARGO_TARGET_DIR/$target/$profile_dir/qosrouted"
[ -x "$bin" ] || die "no binary at $bin"

# 4. Report: size, stripped size, glibc floor.
size=$(stat -c %s "$bin")
strip_tool=""
case "$target" in
    aarch64-*) strip_tool=aarch64-linux-gnu-strip; strip_pkg=binutils-aarch64-linux-gnu ;;
    armv7-*) strip_tool=arm-linux-gnueabihf-strip; strip_pkg=binutils-arm-linux-gnueabihf ;;
esac
command -v "$strip_tool" >/dev/null || [ "$install" = 0 ] || need_apt "$strip_pkg"
stripped="?"
if command -v "$strip_tool" >/dev/null; then
    tmp="$(mktemp)"
    "$strip_tool" -o "$tmp" "$bin"
    stripped=$(stat -c %s "$tmp")
    rm -f "$tmp"
fi
echo "binary:   $bin"
echo "built in: $((end - start)) s"
echo "size:     $size bytes ($(awk "BEGIN{printf \"%.2f\", $size/1048576}") MiB)"
[ "$stripped" != "?" ] && echo "stripped: $stripped bytes ($(awk "BEGIN{printf \"%.2f\", $stripped/1048576}") MiB)"
if readelf -d "$bin" 2>/dev/null | grep -q NEEDED; then
    echo "needs:    $(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | tr '\n' ' ')"
    max=$(readelf --dyn-syms -W "$bin" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n1)
    echo "glibc:    newest symbol version GLIBC_$max"
    if [ -n "$floor" ] && [ "$linker" = zig ] && \
       [ "$(printf '%s\n%s\n' "$max" "$floor" | sort -V | tail -n1)" != "$floor" ]; then
        die "binary needs GLIBC_$max, above the floor $floor"
    fi
else
    echo "linkage:  static"
fi

#!/usr/bin/env bash
# The no_std client in CI: build the firmware for a bare-metal Cortex-M4F with no allocator
# (the link fails if anything needs one), check that neither `alloc` nor an allocator symbol is
# in it, lint it for that target, then run the codec tests on the host. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=thumbv7em-none-eabihf
pkg=qosroute-no-std-client

if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  rustup target add "$target"
fi

echo "== no-std: firmware for $target (release)"
cargo build --locked --release --target "$target" -p "$pkg" --features bare-metal
elf="${CARGO_TARGET_DIR:-target}/$target/release/qosroute-firmware"

echo "== no-std: no alloc, no std in the crate graph, no allocator symbol in the image"
features="$(cargo tree --locked -e normal,features --target "$target" -p "$pkg" --features bare-metal)"
if grep -E 'alloc|"std"' <<<"$features"; then
  echo "no-std: an alloc or std feature is enabled for $target (above)" >&2
  exit 1
fi
nm="$(command -v llvm-nm || command -v nm || true)"
if [ -n "$nm" ]; then
  if "$nm" "$elf" | grep -E '__rust_alloc|__rdl_alloc|__rg_alloc|__rust_alloc_error_handler'; then
    echo "no-std: allocator symbols in $elf (above)" >&2
    exit 1
  fi
else
  echo "no-std: no nm found; the link above already proves no allocator is needed"
fi
size "$elf" 2>/dev/null || llvm-size "$elf" 2>/dev/null || true

echo "== no-std: clippy for $target (the host's workspace lint skips the firmware binary)"
cargo clippy --locked --release --target "$target" -p "$pkg" --features bare-metal --bins -- -D warnings

echo "== no-std: codec tests on the host (against proto's decoders and encoders)"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked -p "$pkg"
else
  cargo test --locked -p "$pkg"
fi

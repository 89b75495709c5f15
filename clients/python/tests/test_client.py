"""The Python device client against the real qosrouted, a real mosquitto and emulated experts.

Each test is one device (its own name), so the tests share one site without hearing each
other's replies."""

import re
import threading
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

import gateway
from mqtt_proxy import Proxy
from qosroute_client import Client, ConnectError, ErrorCode, QosrouteError

SITE = gateway.SITE


def device(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:6]}"


def wait_for(condition, within: float, what: str):
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.02)


class Listener:
    """A bystander subscribed to a topic with the real broker: records what the daemon
    published there."""

    def __init__(self, port: int, topic: str):
        self.messages = []
        self._subscribed = threading.Event()
        self.m = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        self.m.on_connect = lambda m, *a: m.subscribe(topic, qos=1)
        self.m.on_subscribe = lambda *a: self._subscribed.set()
        self.m.on_message = lambda m, u, msg: self.messages.append((msg.topic, bytes(msg.payload)))
        self.m.connect("127.0.0.1", port)
        self.m.loop_start()
        assert self._subscribed.wait(5), "the bystander could not subscribe"

    def close(self):
        self.m.disconnect()
        self.m.loop_stop()


@pytest.mark.parametrize("protocol,encoding", [(5, "json"), (5, "postcard"), (311, "json"), (311, "postcard")])
def test_a_streamed_answer_arrives_whole_in_order_and_each_chunk_once(site, protocol, encoding):
    with Client("127.0.0.1", site.port, site=SITE, device=device("stream"), protocol=protocol, encoding=encoding) as c:
        s = c.stream("Tell me a long story about the sea.", task="chat", max_tokens=60, slo=0.5)
        chunks = list(s)
        assert [ch.seq for ch in chunks] == list(range(len(chunks)))
        assert len(chunks) >= 3, "a 60-token answer at 5 ms a token streams in several chunks"
        assert [ch.done for ch in chunks] == [False] * (len(chunks) - 1) + [True]
        assert "".join(ch.text for ch in chunks) == gateway.expected_answer(60)
        assert s.final.text == gateway.expected_answer(60)
        assert s.final.output_tokens == 60
        assert {ch.expert for ch in chunks} == {s.final.expert}
        assert c.stats.duplicates == 0 and c.stats.undecodable == 0


def test_ask_returns_the_answer_and_the_gateways_latency_figures(site):
    with Client("127.0.0.1", site.port, site=SITE, device=device("ask")) as c:
        before = time.monotonic()
        a = c.ask("What is the capital of France? Answer briefly.", task="mmlu", max_tokens=24, slo=0.5)
        took = time.monotonic() - before
    assert a.text == gateway.expected_answer(24)
    assert a.expert in gateway.EXPERTS
    assert a.output_tokens == 24
    # The gateway's clock starts when it receives the request, the device's when it publishes.
    assert 0 <= a.ttft_ms <= a.total_ms <= took * 1000 + 5
    assert a.device_ttft_s is not None and a.device_ttft_s <= a.device_total_s <= took
    assert a.s_per_token == pytest.approx(a.total_ms / 1000 / 24, rel=0.05, abs=0.002)
    assert a.slo_met, "5 ms a token against an SLO of 0.5 s a token"


def test_a_tight_slo_is_judged_by_the_gateway(site):
    # 5 ms a token on the experts; routed (the prediction lets it through) or refused, the
    # device learns what the gateway decided.
    with Client("127.0.0.1", site.port, site=SITE, device=device("slo")) as c:
        a = c.ask("Hello", max_tokens=8, slo=0.5)
        assert a.slo_met
        with pytest.raises(QosrouteError) as refused:
            c.ask("Hello", max_tokens=8, slo=1e-6)
        assert refused.value.code == ErrorCode.NO_EXPERT


@pytest.mark.parametrize("protocol", [5, 311])
def test_the_daemons_error_codes_arrive_as_exceptions(site, protocol):
    before = site.outcomes()
    cases = [
        # (what, request, expected code, expected name)
        ("an SLO no expert can meet", dict(prompt="Hi", max_tokens=16, slo=1e-6), ErrorCode.NO_EXPERT, "no_expert"),
        ("a prompt that fits no expert's KV cache", dict(prompt="word " * 1600, max_tokens=16), ErrorCode.NO_EXPERT, "no_expert"),
        ("a prompt over 8192 bytes", dict(prompt="a" * 9000, max_tokens=16), ErrorCode.TOO_LARGE, "too_large"),
        ("max_tokens 0", dict(prompt="Hi", max_tokens=0), ErrorCode.INVALID, "invalid"),
        ("max_tokens over 16384", dict(prompt="Hi", max_tokens=20000), ErrorCode.INVALID, "invalid"),
        ("an unknown task", dict(prompt="Hi", max_tokens=16, task="poetry"), ErrorCode.INVALID, "invalid"),
    ]
    with Client("127.0.0.1", site.port, site=SITE, device=device("err"), protocol=protocol) as c:
        for what, request, code, name in cases:
            with pytest.raises(QosrouteError) as caught:
                c.ask(request.pop("prompt"), timeout=20, **request)
            e = caught.value
            assert (e.code, e.name) == (code, name), what
            assert e.message, what
            assert e.retryable == (code == ErrorCode.NO_EXPERT), what
        # The client still works after its errors.
        assert c.ask("Hi", max_tokens=5).text == gateway.expected_answer(5)
    after = site.outcomes()
    assert after["rejected"] - before.get("rejected", 0) >= 2
    assert after["malformed"] - before.get("malformed", 0) >= 4


def test_the_mqtt_311_reply_topic_carries_the_answer(site):
    dev = device("v311")
    reply_topic = f"qosroute/v1/{SITE}/resp/{dev}"
    bystander = Listener(site.port, f"qosroute/v1/{SITE}/resp/#")
    try:
        with Client("127.0.0.1", site.port, site=SITE, device=dev, protocol=311) as c:
            rid = "r311-" + uuid.uuid4().hex[:8]
            a = c.ask("Hello over MQTT 3.1.1", max_tokens=30, request_id=rid)
            assert a.text == gateway.expected_answer(30)
        wait_for(lambda: any(rid.encode() in p and b'"final"' in p for _, p in bystander.messages), 5, "final seen")
        topics = {t for t, p in bystander.messages if rid.encode() in p}
        assert topics == {reply_topic}, "without MQTT 5 every reply goes to the device's reply topic"
    finally:
        bystander.close()


def test_mqtt5_replies_go_to_the_response_topic_with_correlation_data(site):
    dev = device("v5")
    bystander = Listener(site.port, f"qosroute/v1/{SITE}/resp/#")
    try:
        with Client("127.0.0.1", site.port, site=SITE, device=dev, protocol=5) as c:
            rid = "r5-" + uuid.uuid4().hex[:8]
            a = c.ask("Hello over MQTT 5", max_tokens=30, request_id=rid)
            assert a.text == gateway.expected_answer(30)
            own_topic = c.response_topic
        wait_for(lambda: any(rid.encode() in p and b'"final"' in p for _, p in bystander.messages), 5, "final seen")
        topics = {t for t, p in bystander.messages if rid.encode() in p}
        assert topics == {own_topic} and own_topic != f"qosroute/v1/{SITE}/resp/{dev}"
    finally:
        bystander.close()


def test_a_broker_without_mqtt5_gets_the_311_fallback(site):
    proxy = Proxy(site.port, refuse_v5=True)
    try:
        with Client("127.0.0.1", proxy.port, site=SITE, device=device("old"), protocol="auto") as c:
            assert proxy.refused_v5 == 1, "the client tried MQTT 5 first"
            chunks = list(s := c.stream("Hello, old broker", max_tokens=40))
            assert "".join(ch.text for ch in chunks) == gateway.expected_answer(40)
            assert s.final.output_tokens == 40
            assert c.protocol == 311
        with pytest.raises(ConnectError):
            Client("127.0.0.1", proxy.port, site=SITE, device=device("old"), protocol=5, connect_timeout=5)
    finally:
        proxy.close()


@pytest.mark.parametrize("protocol", [5, 311])
def test_a_final_redelivered_by_the_broker_is_seen_once(site, protocol):
    proxy = Proxy(site.port)
    dev = device("redeliver")
    try:
        # A persistent session (stable client id): the broker keeps what the device did not
        # acknowledge and sends it again when the device is back.
        with Client("127.0.0.1", proxy.port, site=SITE, device=dev, protocol=protocol, client_id=f"cid-{dev}") as c:
            rid = "final-" + uuid.uuid4().hex[:8]
            final_bytes = f'"type":"final","v":1,"id":"{rid}"'.encode()
            proxy.cut_after(final_bytes)
            a = c.ask("Answer, then lose the link", max_tokens=20, request_id=rid)
            assert a.text == gateway.expected_answer(20)
            # paho reconnects by itself; the broker sends the un-acknowledged Final again.
            wait_for(lambda: proxy.count_to_device(final_bytes) == 2, 20, "the broker redelivers the Final")
            assert proxy.cuts == 1 and proxy.connections == 2
            # (the done chunk before it may come again too, when its PUBACK was also lost)
            wait_for(lambda: c.stats.duplicate_ends == 1, 5, f"the client drops the repeat ({c.stats})")
            # The next request gets its own answer, not the repeated one.
            b = c.ask("And the next question", max_tokens=12)
            assert b.id != rid and b.text == gateway.expected_answer(12)
            assert c.stats.duplicate_ends == 1 and c.stats.unknown == 0
    finally:
        proxy.close()


@pytest.mark.parametrize("protocol", [5, 311])
def test_chunks_redelivered_mid_stream_are_seen_once_and_in_order(site, protocol):
    proxy = Proxy(site.port)
    dev = device("midstream")
    try:
        with Client("127.0.0.1", proxy.port, site=SITE, device=dev, protocol=protocol, client_id=f"cid-{dev}") as c:
            rid = "mid-" + uuid.uuid4().hex[:8]
            proxy.cut_after(f'"id":"{rid}","seq":1,'.encode())
            s = c.stream("A long answer across a broken link", max_tokens=120, request_id=rid)
            chunks = list(s)
            assert proxy.cuts == 1, "the link broke mid-answer"
            assert proxy.count_to_device(f'"id":"{rid}","seq":1,'.encode()) == 2, "the broker sent seq 1 again"
            assert [ch.seq for ch in chunks] == list(range(len(chunks)))
            assert s.final.text == gateway.expected_answer(120)
            assert c.stats.duplicates >= 1
    finally:
        proxy.close()


@pytest.mark.parametrize("protocol,encoding", [(5, "json"), (311, "postcard")])
def test_feedback_on_an_answer_reaches_the_gateway(site, protocol, encoding):
    def applied():
        m = re.search(r"^qosroute_feedback_total (\S+)$", site.metrics(), re.M)
        return float(m.group(1)) if m else 0.0

    with Client("127.0.0.1", site.port, site=SITE, device=device("fb"), protocol=protocol, encoding=encoding) as c:
        a = c.ask("Rate me", task="mmlu", max_tokens=8)
        before = applied()
        c.feedback(a.id, 0.9)
        wait_for(lambda: applied() == before + 1, 5, "the gateway applies the rating")

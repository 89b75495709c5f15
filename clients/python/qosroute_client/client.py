"""A qosroute device on paho-mqtt: publishes requests to the gateway `qosrouted` and collects
its replies (chunks in order, then one Final or one Error) per request id."""

from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Union

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from . import wire
from .wire import Chunk, ErrorCode, Final

# MQTT 5 reason code of a CONNACK refusing the protocol version (and what paho reports when a
# 3.1.1-only broker answers an MQTT 5 CONNECT with its return code 1).
_UNSUPPORTED_PROTOCOL_VERSION = 132


class QosrouteError(Exception):
    """The gateway refused or failed a request: `code` is the daemon's stable error code
    (`wire.ErrorCode`, or a plain int for a code newer than this client), `name` its snake-case
    name (`no_expert`), `message` the daemon's explanation, `request_id` the request's id."""

    def __init__(self, code: Union[ErrorCode, int], message: str, request_id: str):
        self.code = code
        self.name = code.wire_name if isinstance(code, ErrorCode) else f"unknown_{int(code)}"
        self.message = message
        self.request_id = request_id
        super().__init__(f"{self.name} ({int(code)}): {message} [request {request_id}]")

    @property
    def retryable(self) -> bool:
        """Whether sending the request again later may succeed (load, rate, a failed expert,
        a restart) rather than the request itself being wrong."""
        return self.code in (
            ErrorCode.RATE_LIMITED,
            ErrorCode.OVERLOADED,
            ErrorCode.NO_EXPERT,
            ErrorCode.EXPERT_FAILED,
            ErrorCode.TIMEOUT,
            ErrorCode.SHUTTING_DOWN,
        )


class ReplyTimeout(TimeoutError):
    """No Final or Error arrived in time (a client-side timeout; the gateway's own limit is the
    error code `timeout`)."""


class ConnectError(ConnectionError):
    """The broker refused the connection or could not be reached."""


@dataclass
class Answer:
    """A served request: the whole text and the gateway's figures (from its Final), plus what
    the device itself measured from its publish."""

    id: str
    text: str
    expert: str
    output_tokens: int
    ttft_ms: int
    total_ms: int
    s_per_token: float
    slo_met: bool
    chunks: int
    device_ttft_s: Optional[float]
    device_total_s: float

    @classmethod
    def of(cls, final: Final, text: str, chunks: int, ttft: Optional[float], total: float) -> "Answer":
        return cls(
            id=final.id,
            text=text,
            expert=final.expert,
            output_tokens=final.output_tokens,
            ttft_ms=final.ttft_ms,
            total_ms=final.total_ms,
            s_per_token=final.s_per_token,
            slo_met=final.slo_met,
            chunks=chunks,
            device_ttft_s=ttft,
            device_total_s=total,
        )


@dataclass
class Stats:
    """What the client dropped: redelivered chunks and finals (MQTT QoS 1 is at least once),
    replies to requests it does not know (a previous run's, another client's) and payloads
    that do not decode."""

    duplicates: int = 0
    duplicate_ends: int = 0  # of which finals and errors
    unknown: int = 0
    undecodable: int = 0


class _Pending:
    """One request in flight: orders chunks by seq, drops repeats, holds the end until the
    chunks before it are out. Touched only under the client's lock."""

    def __init__(self, request_id: str):
        self.id = request_id
        self.events: "queue.Queue[object]" = queue.Queue()
        self.next_seq = 0
        self.early: Dict[int, Chunk] = {}
        self.done_seq: Optional[int] = None
        self.end: Optional[object] = None  # a Final or an Error, held until its turn
        self.sent_at = time.monotonic()
        self.first_chunk_at: Optional[float] = None  # arrival times, on the network thread
        self.end_at: Optional[float] = None

    def chunk(self, c: Chunk) -> bool:
        """False when it is a repeat."""
        if c.seq < self.next_seq or c.seq in self.early:
            return False
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        self.early[c.seq] = c
        while self.next_seq in self.early:
            ready = self.early.pop(self.next_seq)
            self.next_seq += 1
            if ready.done:
                self.done_seq = ready.seq
            self.events.put(ready)
        self._release_end()
        return True

    def finish(self, end: object) -> bool:
        """False when an end was already received."""
        if self.end is not None:
            return False
        self.end = end
        self.end_at = time.monotonic()
        self._release_end()
        return True

    def _release_end(self) -> None:
        if self.end is None:
            return
        # An error ends the request wherever its answer stood; a Final follows the done chunk.
        if isinstance(self.end, wire.Error) or self.done_seq is not None:
            self.events.put(self.end)
            self.end = _RELEASED

    @property
    def released(self) -> bool:
        return self.end is _RELEASED


_RELEASED = object()


class Stream:
    """The reply of one request, as it arrives: iterate for the answer's chunks, in order and
    each once; `final` (an `Answer`) is set when the iteration ends. An error reply raises
    `QosrouteError` from the iteration (after the chunks that came before it)."""

    def __init__(self, client: "Client", pending: _Pending, timeout: float):
        self._client = client
        self._pending = pending
        self._timeout = timeout
        self.id = pending.id
        self.final: Optional[Answer] = None
        self._texts: List[str] = []
        self._over = False

    @property
    def text(self) -> str:
        """The answer's text received so far."""
        return "".join(self._texts)

    def __iter__(self) -> Iterator[Chunk]:
        deadline = self._pending.sent_at + self._timeout
        try:
            while not self._over:
                left = deadline - time.monotonic()
                try:
                    event = self._pending.events.get(timeout=max(left, 0.0))
                except queue.Empty:
                    raise ReplyTimeout(
                        f"request {self.id}: no final reply within {self._timeout} s "
                        f"({len(self._texts)} chunks received)"
                    ) from None
                if isinstance(event, Chunk):
                    self._texts.append(event.text)
                    yield event
                elif isinstance(event, Final):
                    self._over = True
                    p = self._pending
                    self.final = Answer.of(
                        event,
                        self.text,
                        len(self._texts),
                        None if p.first_chunk_at is None else p.first_chunk_at - p.sent_at,
                        (p.end_at or time.monotonic()) - p.sent_at,
                    )
                elif isinstance(event, wire.Error):
                    self._over = True
                    raise QosrouteError(event.code, event.message, self.id)
        finally:
            # Done, failed or abandoned: what still comes for this id is dropped as a repeat.
            self._client._retire(self._pending)

    def answer(self) -> Answer:
        """Consumes the rest of the stream; returns the Answer or raises."""
        for _ in self:
            pass
        assert self.final is not None
        return self.final


class Client:
    """A device of site `site` named `device`, connected to the broker at `host:port`.

    protocol: `5` (MQTT 5: each request carries a response topic and correlation data, and
    replies come back on it), `311` (MQTT 3.1.1: replies come on the device's reply topic
    `qosroute/v1/{site}/resp/{device}`, matched by request id), or `"auto"` (MQTT 5, falling
    back to 3.1.1 when the broker refuses MQTT 5).

    client_id: give a stable one to keep a persistent session (replies published while the
    device is offline are queued by the broker, `session_expiry_s`); without it the client
    connects with a fresh id and a clean session.

    encoding: `"json"` or `"postcard"`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        site: str,
        device: str,
        protocol: Union[int, str] = "auto",
        encoding: str = wire.JSON,
        client_id: Optional[str] = None,
        session_expiry_s: int = 3600,
        username: Optional[str] = None,
        password: Optional[str] = None,
        tls: Optional[dict] = None,
        keepalive: int = 30,
        connect_timeout: float = 10.0,
        remember_finished: int = 4096,
    ):
        if protocol not in (5, 311, "auto"):
            raise ValueError("protocol is 5, 311 or 'auto'")
        if encoding not in (wire.JSON, wire.POSTCARD):
            raise ValueError("encoding is 'json' or 'postcard'")
        if "/" in device or "+" in device or "#" in device or not device:
            raise ValueError("device is one non-empty topic level")
        self.host, self.port = host, port
        self.site, self.device, self.encoding = site, device, encoding
        if client_id is not None and ("+" in client_id or "#" in client_id or not client_id):
            raise ValueError("client_id is non-empty, without + or # (it names the response topic)")
        self.persistent = client_id is not None
        self.client_id = client_id or f"qr-{device}-{uuid.uuid4().hex[:12]}"
        self.session_expiry_s = session_expiry_s
        self._auth = (username, password)
        self._tls = tls
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self.stats = Stats()
        self._lock = threading.Lock()
        self._pending: Dict[str, _Pending] = {}
        self._finished: "collections.OrderedDict[str, None]" = collections.OrderedDict()
        self._remember = remember_finished
        self._ready = threading.Event()
        self._refused: Optional[str] = None
        self._mqtt: Optional[mqtt.Client] = None
        self.protocol: int = 5 if protocol in (5, "auto") else 311
        self._connect(fallback=protocol == "auto")

    # ---- topics

    @property
    def request_topic(self) -> str:
        """Where this device publishes requests (postcard adds the `/pc` suffix for MQTT
        3.1.1, which has no content type)."""
        base = f"qosroute/v1/{self.site}/req/{self.device}"
        if self.encoding == wire.POSTCARD and self.protocol == 311:
            return base + "/pc"
        return base

    @property
    def reply_topic(self) -> str:
        """The device's reply topic (MQTT 3.1.1, and MQTT 5 requests without a response
        topic)."""
        return f"qosroute/v1/{self.site}/resp/{self.device}"

    @property
    def response_topic(self) -> str:
        """Where replies come back: with MQTT 5 a topic of this client's own under the device's
        reply topic (what an ACL allowing `resp/{device}/#` permits), else the reply topic."""
        if self.protocol == 5:
            return f"{self.reply_topic}/{self.client_id}"
        return self.reply_topic

    # ---- connection

    def _new_mqtt(self) -> mqtt.Client:
        kwargs = dict(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id)
        if self.protocol == 5:
            m = mqtt.Client(protocol=mqtt.MQTTv5, **kwargs)
        else:
            m = mqtt.Client(protocol=mqtt.MQTTv311, clean_session=not self.persistent, **kwargs)
        if self._auth[0] is not None:
            m.username_pw_set(*self._auth)
        if self._tls is not None:
            m.tls_set(**self._tls)
        m.reconnect_delay_set(min_delay=1, max_delay=8)
        m.on_connect = self._on_connect
        m.on_subscribe = self._on_subscribe
        m.on_message = self._on_message
        m.on_disconnect = self._on_disconnect
        return m

    def _connect(self, fallback: bool) -> None:
        self._ready.clear()
        self._refused = None
        self._mqtt = self._new_mqtt()
        try:
            if self.protocol == 5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry_s if self.persistent else 0
                # A persistent session is resumed, not cleaned, on the first connect too.
                clean = False if self.persistent else True
                self._mqtt.connect(self.host, self.port, self._keepalive, clean_start=clean, properties=props)
            else:
                self._mqtt.connect(self.host, self.port, self._keepalive)
        except OSError as e:
            raise ConnectError(f"cannot reach the broker at {self.host}:{self.port}: {e}") from e
        self._mqtt.loop_start()
        ok = self._ready.wait(self._connect_timeout)
        if ok and self._refused is None:
            return
        self._mqtt.loop_stop()
        self._mqtt.disconnect()
        refused = self._refused or "no CONNACK and SUBACK in time"
        if fallback and self.protocol == 5 and self._refused in ("protocol", "closed"):
            self.protocol = 311
            return self._connect(fallback=False)
        raise ConnectError(f"broker {self.host}:{self.port}: {refused}")

    def _on_connect(self, m, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self._refused = "protocol" if reason_code.value == _UNSUPPORTED_PROTOCOL_VERSION else str(reason_code)
            # Stop paho from retrying a refused connection; _connect reports it.
            m.disconnect()
            self._ready.set()
            return
        # Subscribe on every connect: a clean session lost the subscription.
        m.subscribe(self.response_topic, qos=1)

    def _on_subscribe(self, m, userdata, mid, reason_codes, properties):
        if any(rc.is_failure for rc in reason_codes):
            self._refused = f"subscription to {self.response_topic} refused ({reason_codes[0]})"
        self._ready.set()

    def _on_disconnect(self, m, userdata, flags, reason_code, properties):
        if not self._ready.is_set() and self._refused is None:
            # Closed before CONNACK: an old broker may just hang up on an MQTT 5 CONNECT.
            self._refused = "closed"
            self._ready.set()

    def close(self) -> None:
        """Disconnects (pending requests' replies are no longer collected)."""
        if self._mqtt is not None:
            self._mqtt.disconnect()
            self._mqtt.loop_stop()
            self._mqtt = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- replies

    def _on_message(self, m, userdata, msg) -> None:
        props = getattr(msg, "properties", None)
        encoding = wire.encoding_of_content_type(getattr(props, "ContentType", None)) or self.encoding
        try:
            reply = wire.decode_reply(msg.payload, encoding)
        except wire.DecodeError:
            with self._lock:
                self.stats.undecodable += 1
            return
        request_id = reply.id
        correlation = getattr(props, "CorrelationData", None)
        if correlation:
            # The request's own tag: it finds the request even when the gateway could not
            # read the id of what it answers (an error reply with an empty id).
            try:
                request_id = bytes(correlation).decode("utf-8")
            except UnicodeDecodeError:
                pass
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None and not request_id:
                waiting = [p for p in self._pending.values() if p.next_seq == 0 and not p.released]
                if len(waiting) == 1 and isinstance(reply, wire.Error):
                    pending = waiting[0]  # MQTT 3.1.1: the only request that can be meant
            is_end = not isinstance(reply, Chunk)
            if pending is None:
                if request_id in self._finished:
                    self.stats.duplicates += 1
                    self.stats.duplicate_ends += is_end
                else:
                    self.stats.unknown += 1
                return
            if isinstance(reply, Chunk):
                fresh = pending.chunk(reply)
            else:
                fresh = pending.finish(reply)
                if fresh:
                    self._remember_finished(pending.id)
            if not fresh:
                self.stats.duplicates += 1
                self.stats.duplicate_ends += is_end

    def _remember_finished(self, request_id: str) -> None:
        self._finished[request_id] = None
        self._finished.move_to_end(request_id)
        while len(self._finished) > self._remember:
            self._finished.popitem(last=False)

    def _retire(self, pending: _Pending) -> None:
        with self._lock:
            if self._pending.get(pending.id) is pending:
                del self._pending[pending.id]
            self._remember_finished(pending.id)

    # ---- requests

    def stream(
        self,
        prompt: str,
        *,
        task: str = "chat",
        max_tokens: int = 256,
        slo: Optional[float] = None,
        deadline_unix_ms: Optional[int] = None,
        priority: int = 0,
        stream: bool = True,
        request_id: Optional[str] = None,
        timeout: float = 120.0,
    ) -> Stream:
        """Sends a request; returns its `Stream` (iterate it for the chunks).

        slo: latency target in seconds per output token (None: the gateway's per-task one).
        The gateway checks the request (bounds: prompt 8192 bytes, max_tokens 1..16384, known
        task) and answers a bad one with an error, raised from the stream."""
        if self._mqtt is None:
            raise ConnectError("the client is closed")
        request_id = request_id or uuid.uuid4().hex
        fields = wire.request_fields(
            request_id,
            prompt,
            task=task,
            max_tokens=max_tokens,
            slo_s_per_token=slo,
            deadline_unix_ms=deadline_unix_ms,
            stream=stream,
            priority=priority,
        )
        payload = wire.encode_request(fields, self.encoding)
        pending = _Pending(request_id)
        with self._lock:
            if request_id in self._pending:
                raise ValueError(f"request id {request_id} is already in flight")
            self._finished.pop(request_id, None)
            self._pending[request_id] = pending
        props = None
        if self.protocol == 5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.response_topic
            props.CorrelationData = request_id.encode("utf-8")
            props.ContentType = wire.CONTENT_TYPES[self.encoding]
        pending.sent_at = time.monotonic()
        info = self._mqtt.publish(self.request_topic, payload, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS and info.rc != mqtt.MQTT_ERR_NO_CONN:
            self._retire(pending)
            raise ConnectError(f"publish failed: {mqtt.error_string(info.rc)}")
        # MQTT_ERR_NO_CONN: paho queues the QoS 1 publish and sends it once reconnected.
        return Stream(self, pending, timeout)

    def ask(self, prompt: str, *, task: str = "chat", max_tokens: int = 256, slo: Optional[float] = None, **kw) -> Answer:
        """Sends a request and waits for its whole answer: returns an `Answer` (text and the
        gateway's latency figures) or raises `QosrouteError` (with the daemon's error code) or
        `ReplyTimeout`."""
        return self.stream(prompt, task=task, max_tokens=max_tokens, slo=slo, **kw).answer()

    def feedback(self, request_id: str, score: float) -> None:
        """Rates an answer, 0.0 (useless) to 1.0 (perfect); the gateway learns the experts'
        quality from it."""
        if self._mqtt is None:
            raise ConnectError("the client is closed")
        topic = f"qosroute/v1/{self.site}/feedback/{self.device}"
        props = None
        if self.protocol == 5:
            props = Properties(PacketTypes.PUBLISH)
            props.ContentType = wire.CONTENT_TYPES[self.encoding]
        elif self.encoding == wire.POSTCARD:
            topic += "/pc"
        self._mqtt.publish(topic, wire.encode_feedback(request_id, score, self.encoding), qos=1, properties=props)

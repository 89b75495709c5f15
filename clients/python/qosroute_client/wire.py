"""The qosroute device wire format (protocol version 1), as `proto/src` defines it.

Two encodings carry the same messages: JSON (field names below) and postcard (the same fields
in the same order, no names: `u8` as one raw byte, other integers as LEB128 varints, strings as
varint length + UTF-8, `bool` as one byte 0/1, `Option` as a tag byte 0/1 then the value, `f32`
as 4 little-endian bytes, enums as a varint index). A reply in postcard starts with the
variant's index: 0 chunk, 1 final, 2 error.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Optional, Union

PROTOCOL_VERSION = 1
MAX_ID_BYTES = 40
MAX_PROMPT_BYTES = 8192
MAX_TOKENS_LIMIT = 16384

JSON = "json"
POSTCARD = "postcard"
CONTENT_TYPES = {JSON: "application/json", POSTCARD: "application/x-postcard"}
TOPIC_SUFFIXES = {JSON: "json", POSTCARD: "pc"}

# proto::Task::ALL, in wire order (the postcard index is the position).
TASKS = (
    "natural_qa",
    "trivia_qa",
    "mmlu",
    "gsm8k",
    "mbpp",
    "math",
    "commonsense_qa",
    "arc_challenge",
    "openbook_qa",
    "gpqa",
    "agentverse-mgsm",
    "agentverse-logicgrid",
    "commongen",
    "human_eval",
    "chat",
)


class ErrorCode(enum.IntEnum):
    """proto::ErrorCode: stable numbers; new codes are only appended."""

    MALFORMED = 1
    TOO_LARGE = 2
    UNSUPPORTED_VERSION = 3
    INVALID = 4
    RATE_LIMITED = 5
    OVERLOADED = 6
    NO_EXPERT = 7
    EXPERT_FAILED = 8
    TIMEOUT = 9
    EXPIRED = 10
    SHUTTING_DOWN = 11
    INTERNAL = 12

    @property
    def wire_name(self) -> str:
        """The daemon's snake-case name (`no_expert`), as in its logs and metrics."""
        return self.name.lower()


def encoding_of_content_type(content_type: Optional[str]) -> Optional[str]:
    if not content_type:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    for encoding, ct in CONTENT_TYPES.items():
        if media == ct:
            return encoding
    return None


@dataclass(frozen=True)
class Chunk:
    """A piece of the answer: `seq` counts from 0; the last one has `done`."""

    id: str
    seq: int
    text: str
    done: bool
    expert: str


@dataclass(frozen=True)
class Final:
    """The end of a served request: the daemon's latency figures."""

    id: str
    expert: str
    output_tokens: int
    ttft_ms: int
    total_ms: int
    s_per_token: float
    slo_met: bool


@dataclass(frozen=True)
class Error:
    """The gateway refused or failed a request; `id` is empty when it could not be read."""

    id: str
    code: Union[ErrorCode, int]
    message: str


Reply = Union[Chunk, Final, Error]


class DecodeError(ValueError):
    """A reply that is not a valid protocol-1 message."""


def request_fields(
    id: str,
    prompt: str,
    *,
    task: str = "chat",
    max_tokens: int = 256,
    slo_s_per_token: Optional[float] = None,
    deadline_unix_ms: Optional[int] = None,
    stream: bool = True,
    priority: int = 0,
) -> dict:
    """A request as a dict of its JSON fields, in wire order."""
    return {
        "v": PROTOCOL_VERSION,
        "id": id,
        "task": task,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "slo_s_per_token": slo_s_per_token,
        "deadline_unix_ms": deadline_unix_ms,
        "stream": stream,
        "priority": priority,
    }


def encode_request(fields: dict, encoding: str = JSON) -> bytes:
    """Encodes a request (see `request_fields`). Checks nothing the gateway checks: it answers
    a bad request with an error reply (`invalid`, `too_large`, ...)."""
    if encoding == JSON:
        # `id` comes before `prompt`, so the gateway can read the id of an oversized request.
        present = {k: v for k, v in fields.items() if v is not None}
        return json.dumps(present, separators=(",", ":")).encode()
    if encoding == POSTCARD:
        out = bytearray([fields["v"] & 0xFF])
        _string(out, fields["id"])
        try:
            _varint(out, TASKS.index(fields["task"]))
        except ValueError:
            _varint(out, len(TASKS) + 1000)  # unknown here: let the gateway say `invalid`
        _string(out, fields["prompt"])
        _varint(out, fields["max_tokens"])
        slo = fields.get("slo_s_per_token")
        if slo is None:
            out.append(0)
        else:
            out.append(1)
            out += struct.pack("<f", slo)
        deadline = fields.get("deadline_unix_ms")
        if deadline is None:
            out.append(0)
        else:
            out.append(1)
            _varint(out, deadline)
        out.append(1 if fields.get("stream", True) else 0)
        out.append(fields.get("priority", 0) & 0xFF)
        return bytes(out)
    raise ValueError(f"unknown encoding {encoding!r} (json or postcard)")


def encode_feedback(id: str, score: float, encoding: str = JSON) -> bytes:
    if encoding == JSON:
        return json.dumps({"v": PROTOCOL_VERSION, "id": id, "score": score}).encode()
    out = bytearray([PROTOCOL_VERSION])
    _string(out, id)
    out += struct.pack("<f", score)
    return bytes(out)


def decode_reply(payload: bytes, encoding: str = JSON) -> Reply:
    """Decodes a reply; raises DecodeError."""
    if encoding == JSON:
        return _decode_reply_json(payload)
    if encoding == POSTCARD:
        return _decode_reply_postcard(payload)
    raise ValueError(f"unknown encoding {encoding!r} (json or postcard)")


def _code(n: int) -> Union[ErrorCode, int]:
    try:
        return ErrorCode(n)
    except ValueError:
        return n  # a code newer than this client: kept as its number


def _decode_reply_json(payload: bytes) -> Reply:
    try:
        m = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"not JSON: {e}") from None
    if not isinstance(m, dict):
        raise DecodeError("a reply is a JSON object")
    if m.get("v") != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {m.get('v')!r}")
    kind = m.get("type")
    try:
        if kind == "chunk":
            return Chunk(str(m["id"]), int(m["seq"]), str(m["text"]), bool(m["done"]), str(m["expert"]))
        if kind == "final":
            return Final(
                str(m["id"]),
                str(m["expert"]),
                int(m["output_tokens"]),
                int(m["ttft_ms"]),
                int(m["total_ms"]),
                float(m["s_per_token"]),
                bool(m["slo_met"]),
            )
        if kind == "error":
            return Error(str(m["id"]), _code(int(m["code"])), str(m["message"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DecodeError(f"{kind} reply: bad or missing field {e}") from None
    raise DecodeError(f"unknown reply type {kind!r}")


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise DecodeError("message ends early")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise DecodeError("bad varint")

    def string(self) -> str:
        n = self.varint()
        if self.pos + n > len(self.data):
            raise DecodeError("message ends early")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise DecodeError("a string that is not UTF-8") from None

    def boolean(self) -> bool:
        b = self.byte()
        if b > 1:
            raise DecodeError("a bool that is neither 0 nor 1")
        return b == 1

    def f32(self) -> float:
        if self.pos + 4 > len(self.data):
            raise DecodeError("message ends early")
        (x,) = struct.unpack_from("<f", self.data, self.pos)
        self.pos += 4
        return x


def _decode_reply_postcard(payload: bytes) -> Reply:
    r = _Reader(bytes(payload))
    index = r.varint()
    v = r.byte()
    if v != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {v}")
    if index == 0:
        reply: Reply = Chunk(r.string(), r.varint(), r.string(), r.boolean(), r.string())
    elif index == 1:
        reply = Final(r.string(), r.string(), r.varint(), r.varint(), r.varint(), r.f32(), r.boolean())
    elif index == 2:
        reply = Error(r.string(), _code(r.varint()), r.string())
    else:
        raise DecodeError(f"unknown reply type {index}")
    if r.pos != len(r.data):
        raise DecodeError("bytes after the end of the message")
    return reply


def _varint(out: bytearray, n: int) -> None:
    if n < 0:
        raise ValueError("a varint is not negative")
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _string(out: bytearray, s: str) -> None:
    raw = s.encode("utf-8")
    _varint(out, len(raw))
    out += raw

"""A TCP proxy in front of the real broker that plays two network facts a device meets:

- an old broker that speaks only MQTT 3.1.1 (`refuse_v5`: an MQTT 5 CONNECT gets the 3.1.1
  CONNACK "unacceptable protocol version"; 3.1.1 connections pass through);
- a link that breaks just after a reply reached the device and before the device's PUBACK
  reached the broker (`cut_after(pattern)`): the broker still holds that QoS 1 message as
  unacknowledged and sends it again (DUP) when the device's session resumes.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import List, Optional


def _read_packet(sock: socket.socket) -> bytes:
    """One whole MQTT packet (fixed header, remaining length, body)."""
    head = _read_exact(sock, 1)
    length, mult, raw_len = 0, 1, b""
    while True:
        b = _read_exact(sock, 1)
        raw_len += b
        length += (b[0] & 0x7F) * mult
        if not b[0] & 0x80:
            break
        mult *= 128
    return head + raw_len + _read_exact(sock, length)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        part = sock.recv(n - len(out))
        if not part:
            raise ConnectionError("closed")
        out += part
    return out


def _protocol_level(connect: bytes) -> int:
    i = 1
    while connect[i] & 0x80:
        i += 1
    i += 1  # past the remaining length
    name_len = int.from_bytes(connect[i : i + 2], "big")
    return connect[i + 2 + name_len]


class Proxy:
    def __init__(self, upstream_port: int, refuse_v5: bool = False):
        self.upstream_port = upstream_port
        self.refuse_v5 = refuse_v5
        self.refused_v5 = 0
        self.connections = 0
        self.cuts = 0
        self.to_device = bytearray()  # everything the broker sent to devices
        self._cut_pattern: Optional[bytes] = None
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, pattern: bytes) -> None:
        """Once: when the broker sends the device something containing `pattern`, pass it on,
        then drop whatever the device answers and close the connection."""
        with self._lock:
            self._cut_pattern = pattern

    def count_to_device(self, pattern: bytes) -> int:
        with self._lock:
            return bytes(self.to_device).count(pattern)

    def close(self) -> None:
        self._closed = True
        for s in [self._listener, *self._sockets]:
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                device, _ = self._listener.accept()
            except OSError:
                return
            self._sockets.append(device)
            threading.Thread(target=self._serve, args=(device,), daemon=True).start()

    def _serve(self, device: socket.socket) -> None:
        try:
            connect = _read_packet(device)
        except (ConnectionError, OSError):
            device.close()
            return
        if self.refuse_v5 and _protocol_level(connect) == 5:
            self.refused_v5 += 1
            device.sendall(b"\x20\x02\x00\x01")  # CONNACK: unacceptable protocol version
            time.sleep(0.05)
            device.close()
            return
        broker = socket.create_connection(("127.0.0.1", self.upstream_port))
        broker.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        device.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sockets.append(broker)
        self.connections += 1
        broker.sendall(connect)
        state = {"blackhole": False}
        threading.Thread(target=self._up, args=(device, broker, state), daemon=True).start()
        self._down(broker, device, state)

    def _up(self, device: socket.socket, broker: socket.socket, state: dict) -> None:
        try:
            while True:
                data = device.recv(65536)
                if not data:
                    break
                if not state["blackhole"]:
                    broker.sendall(data)
        except OSError:
            pass
        finally:
            _close(broker)

    def _down(self, broker: socket.socket, device: socket.socket, state: dict) -> None:
        try:
            while True:
                data = broker.recv(65536)
                if not data:
                    break
                with self._lock:
                    self.to_device += data
                    cut = self._cut_pattern is not None and self._cut_pattern in data
                    if cut:
                        self._cut_pattern = None
                if cut:
                    # The device's PUBACK for this must never reach the broker.
                    state["blackhole"] = True
                device.sendall(data)
                if cut:
                    time.sleep(0.3)  # the device has it and has answered (into the void)
                    self.cuts += 1
                    break
        except OSError:
            pass
        finally:
            _close(device)
            _close(broker)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass

"""Loopback stand-ins for Vero and Segment: answer every request at once, and
record which benchmark tokens arrived when.

A raw-socket HTTP/1.1 server (keep-alive, a thread per connection) in a few
forked processes that share one listening socket: much cheaper per request
than any framework, so the service is what a benchmark measures. Each process
counts the distinct tokens it has seen in shared memory (the harness polls the
sum) and appends "token arrival_time" lines to its own file; with `capture`
it also keeps every request's path and body, for the baselines to replay.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import socket
import threading
import time

TOKEN = re.compile(rb"bk_[a-z0-9]+_[0-9]+_[0-9]+")

VERO_REPLY = b'{"status": 200, "message": "Success."}'
SEGMENT_REPLY = b'{"success": true}'


def _response(body: bytes) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    return head + body


class _Recorder:
    """One process's view: distinct tokens seen, and buffered lines to flush."""

    def __init__(self, slot: int, tokens, requests, out_dir: str, capture: bool):
        self.slot = slot
        self.tokens = tokens
        self.requests = requests
        self.seen: set[bytes] = set()
        self.lock = threading.Lock()
        self.lines: list[bytes] = []
        self.captured: list[bytes] = []
        self.capture = capture
        self.arrivals = open(os.path.join(out_dir, f"arrivals.{slot}"), "ab")
        self.requests_file = (
            open(os.path.join(out_dir, f"requests.{slot}.jsonl"), "ab") if capture else None
        )

    def record(self, method: bytes, path: bytes, body: bytes) -> None:
        now = time.time()
        found = set(TOKEN.findall(body))
        stamp = b" %.6f\n" % now
        with self.lock:
            new = found - self.seen
            self.seen |= new
            self.tokens[self.slot] += len(new)
            self.requests[self.slot] += 1
            self.lines.extend(token + stamp for token in found)
            if self.capture:
                self.captured.append(
                    json.dumps([method.decode(), path.decode(), body.decode()]).encode() + b"\n"
                )

    def flush(self) -> None:
        with self.lock:
            lines, self.lines = self.lines, []
            captured, self.captured = self.captured, []
        if lines:
            self.arrivals.write(b"".join(lines))
            self.arrivals.flush()
        if captured and self.requests_file:
            self.requests_file.write(b"".join(captured))
            self.requests_file.flush()


def _read_request(conn: socket.socket, buffer: bytearray) -> tuple[bytes, bytes, bytes] | None:
    """(method, path, body) of the next request on a keep-alive connection, or None at EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n")
    head = bytes(buffer[:end]).split(b"\r\n")
    del buffer[: end + 4]
    method, path = head[0].split(b" ")[:2]
    headers = {}
    for line in head[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        return method, path, _read_chunked(conn, buffer)
    length = int(headers.get(b"content-length", b"0"))
    while len(buffer) < length:
        chunk = conn.recv(max(65536, length - len(buffer)))
        if not chunk:
            return None
        buffer += chunk
    body = bytes(buffer[:length])
    del buffer[:length]
    return method, path, body


def _read_chunked(conn: socket.socket, buffer: bytearray) -> bytes:
    body = bytearray()
    while True:
        while b"\r\n" not in buffer:
            buffer += conn.recv(65536)
        line_end = buffer.index(b"\r\n")
        size = int(bytes(buffer[:line_end]).split(b";")[0], 16)
        del buffer[: line_end + 2]
        while len(buffer) < size + 2:
            buffer += conn.recv(65536)
        body += buffer[:size]
        del buffer[: size + 2]
        if size == 0:
            return bytes(body)


def _serve_connection(conn: socket.socket, recorder: _Recorder, reply: bytes) -> None:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buffer = bytearray()
    try:
        while True:
            request = _read_request(conn, buffer)
            if request is None:
                return
            recorder.record(*request)
            conn.sendall(reply)
    except (OSError, ValueError, IndexError):
        return
    finally:
        conn.close()


def _process_main(
    listener: socket.socket, slot: int, tokens, requests, out_dir: str, capture: bool, reply: bytes
) -> None:
    recorder = _Recorder(slot, tokens, requests, out_dir, capture)

    def stop(signum, frame):
        recorder.flush()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def flusher():
        while True:
            time.sleep(0.2)
            recorder.flush()

    threading.Thread(target=flusher, daemon=True).start()
    while True:
        conn, _ = listener.accept()
        threading.Thread(
            target=_serve_connection, args=(conn, recorder, reply), daemon=True
        ).start()


class StandIn:
    """`processes` forked servers on one 127.0.0.1 port; `url` is its base."""

    def __init__(
        self, name: str, reply: bytes, out_dir: str, processes: int = 2, capture: bool = False
    ):
        self.name = name
        self.out_dir = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1024)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        context = multiprocessing.get_context("fork")
        self._tokens = context.Array("q", processes, lock=False)
        self._requests = context.Array("q", processes, lock=False)
        self._processes = [
            context.Process(
                target=_process_main,
                daemon=True,
                name=f"standin-{name}-{slot}",
                args=(
                    self.listener,
                    slot,
                    self._tokens,
                    self._requests,
                    out_dir,
                    capture,
                    _response(reply),
                ),
            )
            for slot in range(processes)
        ]
        for process in self._processes:
            process.start()

    def tokens_seen(self) -> int:
        """Distinct tokens seen (a token retried into another process counts twice)."""
        return sum(self._tokens)

    def requests_seen(self) -> int:
        return sum(self._requests)

    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def stop(self) -> None:
        for process in self._processes:
            if process.is_alive():
                process.terminate()
        for process in self._processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.listener.close()

    def arrivals(self) -> dict[str, float]:
        """token -> first arrival time, over all processes."""
        first: dict[str, float] = {}
        for name in os.listdir(self.out_dir):
            if not name.startswith("arrivals."):
                continue
            with open(os.path.join(self.out_dir, name)) as lines:
                for line in lines:
                    token, _, stamp = line.partition(" ")
                    at = float(stamp)
                    if token not in first or at < first[token]:
                        first[token] = at
        return first

    def captured(self) -> list[tuple[str, str, str]]:
        """(method, path, body) of every request received, when started with capture."""
        requests = []
        for name in sorted(os.listdir(self.out_dir)):
            if name.startswith("requests."):
                with open(os.path.join(self.out_dir, name)) as lines:
                    requests.extend(tuple(json.loads(line)) for line in lines)
        return requests

    def __enter__(self) -> StandIn:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""A Vero stand-in at internet latency: every answer comes `latency` seconds
after its request arrived, however many are waiting, and for a while it can
answer 429 with Retry-After instead, as a rate-limited account would.

One asyncio server in a forked process on 127.0.0.1 (an await per request,
not a thread), so thousands of calls can wait at once. It keeps the distinct
benchmark tokens it has seen, counts calls waiting for their answer (and the
most at once), and on stop writes one "arrival_time status tokens" line per
request for the harness to read.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import socket
import time

from bench.standin import TOKEN

VERO_REPLY = b'{"status": 200, "message": "Success."}'
THROTTLED_REPLY = b'{"status": 429, "message": "Too many requests."}'

# Shared counters, by index.
REQUESTS, TOKENS, WAITING, MOST_WAITING, THROTTLED = range(5)
# Shared settings, by index: answer 429 to requests arriving before THROTTLE_UNTIL.
THROTTLE_UNTIL, RETRY_AFTER = range(2)


def _response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: application/json\r\n"
        + extra
        + b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


async def _serve(listener: socket.socket, latency: float, counters, settings, log_path: str):
    seen: set[bytes] = set()
    lines: list[bytes] = []
    ok = _response(b"200 OK", VERO_REPLY)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                arrived = time.time()
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                body = await reader.readexactly(length) if length else b""
                counters[REQUESTS] += 1
                throttled = arrived < settings[THROTTLE_UNTIL]
                found = set(TOKEN.findall(body))
                if throttled:
                    counters[THROTTLED] += 1
                    answer = _response(
                        b"429 Too Many Requests",
                        THROTTLED_REPLY,
                        b"Retry-After: %d\r\n" % int(settings[RETRY_AFTER]),
                    )
                else:
                    new = found - seen
                    seen.update(new)
                    counters[TOKENS] += len(new)
                    answer = ok
                lines.append(b"%.6f %d %d\n" % (arrived, 429 if throttled else 200, len(found)))
                counters[WAITING] += 1
                counters[MOST_WAITING] = max(counters[MOST_WAITING], counters[WAITING])
                await asyncio.sleep(max(arrived + latency - time.time(), 0.0))
                counters[WAITING] -= 1
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    await asyncio.start_server(handle, sock=listener, backlog=4096)
    await stopped.wait()
    with open(log_path, "wb") as log:
        log.write(b"".join(lines))
    # Calls still waiting are simply dropped, as a server going away drops them.
    os._exit(0)


def _main(listener, latency, counters, settings, log_path) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_serve(listener, latency, counters, settings, log_path))


class SlowStandIn:
    def __init__(self, out_dir: str, latency: float = 0.15):
        os.makedirs(out_dir, exist_ok=True)
        self.log_path = os.path.join(out_dir, "arrivals.txt")
        self.latency = latency
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        context = multiprocessing.get_context("fork")
        self._counters = context.Array("q", 5, lock=False)
        self._settings = context.Array("d", 2, lock=False)
        self._process = context.Process(
            target=_main,
            args=(self.listener, latency, self._counters, self._settings, self.log_path),
            daemon=True,
            name="standin-slow-vero",
        )
        self._process.start()

    def throttle(self, seconds: float, retry_after: int) -> float:
        """Answer 429 with `Retry-After: retry_after` to what arrives in the next
        `seconds`; returns when that began."""
        began = time.time()
        self._settings[RETRY_AFTER] = retry_after
        self._settings[THROTTLE_UNTIL] = began + seconds
        return began

    def tokens_seen(self) -> int:
        return self._counters[TOKENS]

    def requests_seen(self) -> int:
        return self._counters[REQUESTS]

    def waiting(self) -> int:
        return self._counters[WAITING]

    def most_waiting(self) -> int:
        return self._counters[MOST_WAITING]

    def stop(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(15)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self.listener.close()

    def arrivals(self) -> list[tuple[float, int, int]]:
        """(arrival time, status answered, tokens in it) per request, after stop."""
        if not os.path.exists(self.log_path):
            return []
        result = []
        with open(self.log_path) as lines:
            for line in lines:
                at, status, tokens = line.split()
                result.append((float(at), int(status), int(tokens)))
        return result

    def __enter__(self) -> SlowStandIn:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

"""Open-loop load at a fixed rate, recording when each token was acknowledged.

Request i is due at start + i / rate whatever happened to earlier ones, so a
slow answer shows as latency instead of quietly lowering the rate (wrk's
closed loop would do that). Threads share the schedule; each keeps one
keep-alive http.client connection, which costs far less CPU per request than
requests, leaving the cores to the service.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class PacedResult:
    sent: int = 0
    acked: dict[str, float] = field(default_factory=dict)  # token -> acknowledgement time
    statuses: dict[int, int] = field(default_factory=dict)  # non-200 status -> count
    failures: int = 0  # no answer at all
    latencies: list[float] = field(default_factory=list)  # answer times, seconds
    late: int = 0  # requests that left over 100 ms after they were due

    @property
    def errors(self) -> int:
        return self.failures + sum(self.statuses.values())


# build(i) -> (path, body bytes, tokens the body carries)
Builder = Callable[[int], tuple[str, bytes, list[str]]]


def run(
    port: int,
    headers: dict[str, str],
    build: Builder,
    rate: float,
    seconds: float,
    threads: int = 16,
    stop: threading.Event | None = None,
) -> PacedResult:
    result = PacedResult()
    lock = threading.Lock()
    total = int(rate * seconds)
    next_index = [0]
    started = time.monotonic() + 0.05
    stop = stop or threading.Event()

    def take() -> int | None:
        with lock:
            if next_index[0] >= total or stop.is_set():
                return None
            next_index[0] += 1
            return next_index[0] - 1

    def sender():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
        while (index := take()) is not None:
            due = started + index / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            path, body, tokens = build(index)
            sent_at = time.monotonic()
            try:
                conn.request("POST", path, body, headers)
                response = conn.getresponse()
                response.read()
                status = response.status
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
                with lock:
                    result.failures += 1
                continue
            acked_at = time.time()
            with lock:
                result.sent += 1
                result.latencies.append(time.monotonic() - sent_at)
                if sent_at - due > 0.1:
                    result.late += 1
                if status == 200:
                    for token in tokens:
                        result.acked[token] = acked_at
                else:
                    result.statuses[status] = result.statuses.get(status, 0) + 1
        conn.close()

    workers = [threading.Thread(target=sender, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return result

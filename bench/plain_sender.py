"""The delivery baselines: a plain loop posting recorded requests with one
pooled requests.Session shared by `threads` threads, and nothing else (no
outbox, no claims, no settling). Run as its own process so that it has a
whole interpreter, as a gunicorn worker does.

    python -m bench.plain_sender REQUESTS_JSONL BASE_URL THREADS [AUTH_HEADER]

Prints {"requests": n, "seconds": s, "errors": e} as JSON.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import requests
from requests.adapters import HTTPAdapter


def main(path: str, base_url: str, threads: int, auth: str | None) -> None:
    with open(path) as lines:
        calls = [json.loads(line) for line in lines]
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=threads, max_retries=0)
    session.mount("http://", adapter)
    headers = {"Content-Type": "application/json"}
    if auth:
        headers["Authorization"] = auth
    errors = [0]
    shares = [calls[k::threads] for k in range(threads)]

    def post_all(share):
        for method, call_path, body in share:
            response = session.request(
                method, base_url + call_path, data=body.encode(), headers=headers, timeout=10
            )
            if response.status_code != 200:
                errors[0] += 1

    workers = [threading.Thread(target=post_all, args=(share,)) for share in shares]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - started
    print(json.dumps({"requests": len(calls), "seconds": seconds, "errors": errors[0]}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)

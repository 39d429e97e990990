"""How long a quick stop (SIGINT) takes under load, over many shutdowns.

    .venv/bin/python -m bench.quickstop --runs 140            # SIGINT to the master or the group, alternating
    .venv/bin/python -m bench.quickstop --runs 50 --to group   # the whole process group, as a platform does

Each run starts `python -m service.web` (the Procfile's web line) on a free
loopback port with a SQLite outbox in a fresh temporary folder and loopback
stand-ins for Vero and Segment, posts from a few clients (a new connection for
each request, so the workers' main loops keep handing connections to their
thread pools), sends SIGINT, and times until the master has exited. A worker
that hangs is killed by the master after gunicorn's graceful timeout (25 s):
such a run shows as ~25 s and as a worker without its "Worker exiting" line.
Bounded: at most --runs runs, each waited for at most 40 s; 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from tests.standin import Upstream
from tests.support import ROOT, free_port
from tests.test_faults import SHARED_SECRET, service_env

EXIT_WAIT_SECONDS = 40.0


def _post_until(url: str, stop: threading.Event, client: int) -> None:
    seq = 0
    while not stop.is_set():
        seq += 1
        body = {"type": "track", "userId": f"u{client}-{seq % 50}", "event": "E"}
        try:
            requests.post(f"{url}/v1/track", json=body, auth=(SHARED_SECRET, ""), timeout=5)
        except requests.RequestException:
            time.sleep(0.005)  # stopping: not listening any more


def _ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service stopped while starting:\n{log.read_text()}")
        if log.read_text().count("delivery started") >= 2:
            try:
                if requests.get(url + "/readyz", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
        time.sleep(0.05)
    raise SystemExit(f"not ready within 30 s:\n{log.read_text()}")


def one_run(number: int, to: str, vero: Upstream, segment: Upstream) -> tuple[float, list[str]]:
    """Seconds from the SIGINT to the master's exit, and what went wrong."""
    with tempfile.TemporaryDirectory(prefix="quickstop-") as folder:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            **service_env(f"sqlite:///{folder}/outbox.db", vero.url, segment.url),
        }
        log = Path(folder) / "web.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "service.web"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        stop = threading.Event()
        clients = [threading.Thread(target=_post_until, args=(url, stop, n)) for n in range(6)]
        try:
            _ready(url, proc, log)
            for client in clients:
                client.start()
            time.sleep(0.2 + (number % 7) * 0.1)
            sent = time.monotonic()
            if to == "group":
                os.killpg(proc.pid, signal.SIGINT)
            else:
                os.kill(proc.pid, signal.SIGINT)
            try:
                proc.wait(EXIT_WAIT_SECONDS)
            except subprocess.TimeoutExpired:
                return EXIT_WAIT_SECONDS, [f"still running after {EXIT_WAIT_SECONDS} s"]
            took = time.monotonic() - sent
        finally:
            stop.set()
            for client in clients:
                if client.ident:
                    client.join(10)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        text = log.read_text()
        booted = set(re.findall(r"Booting worker with pid: (\d+)", text))
        exited = set(re.findall(r"Worker exiting \(pid: (\d+)\)", text))
        problems = [f"worker {pid} never logged its exit (killed)" for pid in booted - exited]
        if proc.returncode != 0:
            problems.append(f"exit status {proc.returncode}")
        if problems:
            (ROOT / "bench" / "out").mkdir(exist_ok=True)
            kept = ROOT / "bench" / "out" / f"quickstop-{number}.log"
            kept.write_text(text)
            problems.append(f"log kept in {kept}")
        return took, problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=140)
    parser.add_argument("--to", choices=["master", "group", "both"], default="both")
    args = parser.parse_args()
    if not 1 <= args.runs <= 1000:
        parser.error("--runs: 1 to 1000")
    vero, segment = Upstream().start(), Upstream().start()
    times: list[float] = []
    try:
        for number in range(args.runs):
            to = args.to if args.to != "both" else ("master", "group")[number % 2]
            took, problems = one_run(number, to, vero, segment)
            times.append(took)
            note = "; ".join(problems)
            print(f"run {number + 1:3d} SIGINT to {to:6s} {took:6.2f} s {note}", flush=True)
    finally:
        vero.stop()
        segment.stop()
    slow = sum(1 for took in times if took > 5)
    print(
        f"runs {len(times)}  median {statistics.median(times):.2f} s  "
        f"max {max(times):.2f} s  over 5 s: {slow}"
    )


if __name__ == "__main__":
    main()

"""Starting and stopping gunicorn (the service or the ingest baseline) for a
benchmark, and reading its workers' memory and the outbox's depth."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")

# Every gunicorn this process started, so that an interrupted run stops them.
STARTED: list[Gunicorn] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Gunicorn:
    """gunicorn run from the repository root as the Procfile's web line runs it
    (`gunicorn wsgi:app`, settings from gunicorn.conf.py), bound to 127.0.0.1."""

    def __init__(
        self, env: dict[str, str], log_path: Path, app: str = "wsgi:app", config: str | None = None
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"PATH": os.environ["PATH"], "PORT": str(self.port), **env}
        self.command = [str(GUNICORN), app, "--bind", f"127.0.0.1:{self.port}"]
        if config:
            self.command += ["--config", config]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> Gunicorn:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        STARTED.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"gunicorn exited with {self.proc.returncode}; see {self.log_path}"
                )
            if self._answers() and len(self.worker_pids()) >= self._expected_workers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer in {timeout}s; see {self.log_path}")

    def _expected_workers(self) -> int:
        return int(self.env.get("WEB_CONCURRENCY", os.cpu_count() or 2))

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1):
                return True
        except OSError as exc:  # the baseline app has no /healthz: a 404 is an answer too
            return getattr(exc, "code", None) is not None

    def worker_pids(self) -> list[int]:
        if self.proc is None:
            return []
        try:
            text = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def peak_worker_rss_mb(self) -> float:
        """The largest VmHWM (peak resident set) among the workers, in MB."""
        peak = 0.0
        for pid in self.worker_pids():
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024)
            except OSError:
                pass
        return peak

    def stop(self, timeout: float = 40.0) -> None:
        """SIGTERM as a PaaS does; SIGKILL the group if it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        if self in STARTED:
            STARTED.remove(self)


def stop_all() -> None:
    for gunicorn in list(STARTED):
        gunicorn.stop(timeout=10)


def pending_depth(db_path: str) -> dict[str, int]:
    """Pending (waiting or in flight) items by direction, read beside the service."""
    if not os.path.exists(db_path):
        return {}
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        # The outbox table holds unfinished work only (delivered and dead work
        # is in outbox_history).
        rows = conn.execute("SELECT direction, count(*) FROM outbox GROUP BY direction").fetchall()
    except sqlite3.Error:
        return {}
    finally:
        conn.close()
    return dict(rows)


def stored_count(db_path: str, direction: str) -> int:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(
            "SELECT (SELECT count(*) FROM outbox WHERE direction = :d)"
            " + (SELECT count(*) FROM outbox_history WHERE direction = :d)",
            {"d": direction},
        ).fetchone()[0]
    finally:
        conn.close()

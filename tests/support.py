"""Helpers shared by the tests: the real service under gunicorn, and signing."""

from __future__ import annotations

import hashlib
import hmac
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


def procfile_line(process: str, root: Path = ROOT) -> str:
    """The command the Procfile gives for `process` (web, worker)."""
    for line in (root / "Procfile").read_text().splitlines():
        name, _, command = line.partition(":")
        if name == process and not line.startswith("#"):
            return command.strip()
    raise LookupError(f"no {process}: line in the Procfile")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


class Service:
    """The real app under gunicorn, started from the repository root exactly as
    the Procfile does, with only the environment given (plus PATH)."""

    def __init__(self, env: dict[str, str], log_path: Path, args: tuple[str, ...] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.env = {"PATH": os.environ["PATH"], "PORT": str(self.port), **env}
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Service:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(GUNICORN), "wsgi:app", "--bind", f"127.0.0.1:{self.port}", *self.args],
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.logs()}")
            try:
                if requests.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                # Not listening yet, or listening while the workers still boot.
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not answer in {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM, as a PaaS does, and wait for the graceful exit."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group: master and workers die mid-flight."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self._log.close()

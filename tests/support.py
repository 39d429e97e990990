"""Helpers shared by the tests: the real service under gunicorn, signing, and
reading /metrics."""

from __future__ import annotations

import base64
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
from prometheus_client.parser import text_string_to_metric_families

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
    """Segment's X-Signature: the hex HMAC-SHA1 of the body with the secret."""
    return hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()


def basic_auth(user: str, password: str = "") -> str:
    """An HTTP Basic Authorization value, as Segment's libraries send a write
    key (the user name, an empty password)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def metric(text: str, name: str, **labels: object) -> float | None:
    """The value of the sample `name` with exactly these labels in Prometheus
    text (whatever their order), or None when there is no such sample."""
    wanted = {key: str(value) for key, value in labels.items()}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == wanted:
                return sample.value
    return None


def scrape(base_url: str) -> str:
    """A running service's /metrics, for `metric` (where a labelled counter not
    incremented yet has no sample: None, not 0)."""
    return requests.get(base_url + "/metrics", timeout=5).text


class Service:
    """The real app under gunicorn, started from the repository root exactly as
    the Procfile does, with only the environment given (plus PATH).

    Stopping is gunicorn's graceful stop, which keeps a kept-alive client
    connection open for up to 2 s: a test that still holds a `requests`
    response (its pool holds the connection) or a client library's session
    when the service stops waits that long for nothing."""

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
        try:
            return self.start()
        except BaseException:
            self.__exit__()  # a service that failed to start leaves nothing behind
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()
            self._log.close()

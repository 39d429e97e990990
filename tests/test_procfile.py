"""The Procfile under a Procfile runner (honcho, as `heroku local` is): every
line starts, but only what the chosen store needs delivers, and a repeated
SIGTERM stops everything cleanly."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.standin import Upstream
from tests.support import GUNICORN, ROOT, free_port
from tests.test_shutdown import wait_until

pytestmark = pytest.mark.e2e

HONCHO = Path(sys.executable).with_name("honcho")


def test_honcho_starts_every_line_but_only_the_web_delivers_on_sqlite(tmp_path):
    vero = Upstream().start()
    port = free_port()
    env = {
        "PATH": f"{GUNICORN.parent}:{os.environ['PATH']}",
        "HOST": "127.0.0.1",
        "DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db",
        "VERO_AUTH_TOKEN": "procfile-vero-token",
        "VERO_API_URL": vero.url,
        "SEGMENT_SHARED_SECRET": "procfile-shared-secret",
        "WEB_CONCURRENCY": "2",
        "DELIVERY_POLL_SECONDS": "0.05",
    }
    log = tmp_path / "honcho.log"
    honcho = subprocess.Popen(
        [str(HONCHO), "start", "--no-colour", "-p", str(port)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert honcho.poll() is None, log.read_text()
            try:
                return requests.get(url + "/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, 30, "the web line did not start")
        wait_until(lambda: "this worker waits" in log.read_text(), 30, "the worker did not say")
        users = [f"u-{uuid.uuid4().hex[:8]}" for _ in range(20)]
        for user in users:
            answer = requests.post(
                url + "/v1/identify",
                json={"userId": user, "traits": {"plan": "pro"}},
                auth=("procfile-shared-secret", ""),
                timeout=5,
            )
            assert answer.status_code == 200
        wait_until(lambda: len(vero.snapshot()) >= len(users), 30, "not delivered")

        lines = log.read_text().splitlines()
        worker = [line for line in lines if re.match(r"^\S+ worker\.1 +\| ", line)]
        web = [line for line in lines if re.match(r"^\S+ web\.1 +\| ", line)]
        assert any("DELIVERY_IN_WEB is on" in line for line in worker)
        assert not any("delivery started" in line for line in worker)  # only web delivers
        assert any("delivery started" in line for line in web)
        assert {json.loads(r.body)["id"] for r in vero.snapshot()} >= set(users)

        # Stopped as Heroku stops a dyno: SIGTERM to every process, twice.
        for _ in range(2):
            for pid in [honcho.pid, *descendants(honcho.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            time.sleep(0.05)
        honcho.wait(20)  # honcho itself kills what is left after 5 s
        text = log.read_text()
        assert "web.1 stopped (rc=0)" in text and "worker.1 stopped (rc=0)" in text, text
        assert "SIGKILL" not in text
    finally:
        if honcho.poll() is None:
            os.killpg(honcho.pid, signal.SIGKILL)
        for pid in descendants(honcho.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        vero.stop()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (honcho gives each line a session of its own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found

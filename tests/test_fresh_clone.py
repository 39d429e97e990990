"""A fresh clone installed exactly as Heroku's Python buildpack installs it:
the committed tree, the Python .python-version names, `pip install -r
requirements.txt` into a new environment, then the Procfile's web line with
PORT set and DATABASE_URL in Heroku's postgres:// spelling. One message each
way must reach the (loopback) upstreams.

The one slow test of the suite (one install, about a minute with pip's cache
cold); it needs PyPI, as a deployment does."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess

import pytest
import requests

from tests.standin import Upstream
from tests.support import ROOT, free_port, procfile_line
from tests.test_shutdown import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]


def interpreter(version: str) -> str | None:
    """A Python of that version on this machine, as the buildpack would pick."""
    candidates = [shutil.which(f"python{version}") or ""]
    candidates += sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python3"))
    )
    candidates += [f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    for candidate in filter(None, candidates):
        try:
            found = subprocess.run(
                [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except OSError:
            continue
        if found == version:
            return candidate
    return None


def test_a_fresh_clone_installed_from_requirements_serves_both_ways(tmp_path, postgres_url):
    version = (ROOT / ".python-version").read_text().strip()
    python = interpreter(version)
    if python is None:
        pytest.skip(f"no Python {version} (.python-version) on this machine")
    app = tmp_path / "app"
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(app)], check=True, timeout=120)
    subprocess.run(["git", "checkout", "--quiet", head], cwd=app, check=True, timeout=60)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "-r", "requirements.txt"],
        cwd=app,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # The project itself was installed (".[postgres]"), not only its needs.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import service, psycopg; print(service.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    vero, segment = Upstream().start(), Upstream().start()
    port = free_port()
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "PORT": str(port),
        "HOST": "127.0.0.1",  # a dyno listens on 0.0.0.0; tests stay on loopback
        "DATABASE_URL": "postgres://" + postgres_url.split("://", 1)[1],
        "VERO_AUTH_TOKEN": "fresh-vero-token",
        "VERO_API_URL": vero.url,
        "SEGMENT_SHARED_SECRET": "fresh-shared-secret",
        "SEGMENT_WRITE_KEY": "fresh-write-key",
        "SEGMENT_API_URL": segment.url,
        "VERO_WEBHOOK_TOKEN": "fresh-webhook-token",
        "DELIVERY_POLL_SECONDS": "0.05",
    }
    log = tmp_path / "web.log"
    web = subprocess.Popen(
        ["sh", "-c", procfile_line("web", app)],
        cwd=app,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert web.poll() is None, log.read_text()
            try:
                return requests.get(url + "/readyz", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        wait_until(up, 60, "the web line did not become ready")
        identify = {"type": "identify", "userId": "fresh-user", "traits": {"plan": "pro"}}
        answer = requests.post(
            url + "/v1/identify", json=identify, auth=("fresh-shared-secret", ""), timeout=10
        )
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
        webhook = {
            "type": "opened",
            "opened_at": 1_700_000_000,
            "user": {"id": "fresh-user"},
            "campaign": {"id": 1},
            "message_id": "fresh-1",
        }
        answer = requests.post(url + "/vero/webhooks/fresh-webhook-token", json=webhook, timeout=10)
        assert answer.status_code == 200 and answer.json()["accepted"] == 1
        wait_until(lambda: vero.snapshot() and segment.snapshot(), 60, "not delivered")
        [call] = vero.snapshot()
        assert (call.path, json.loads(call.body)["id"]) == ("/users/track", "fresh-user")
        [batch] = segment.snapshot()
        [message] = json.loads(batch.body)["batch"]
        assert (message["userId"], message["event"]) == ("fresh-user", "Email Opened")
        web.send_signal(signal.SIGTERM)
        assert web.wait(30) == 0
    finally:
        if web.poll() is None:
            os.killpg(web.pid, signal.SIGKILL)
        vero.stop()
        segment.stop()

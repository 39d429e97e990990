"""The nginx configuration shipped for VMs (deploy/nginx/vero-bridge.conf),
run in front of gunicorn on loopback ports: slow clients no longer hold
gunicorn's threads, the body limit fits MAX_BODY_BYTES, and no log nginx
writes shows the webhook token.

Skips, saying so, where nginx is not installed (.ci/run installs it)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import pytest
import requests

from tests.support import ROOT, Service, free_port
from tests.test_shutdown import wait_until

pytestmark = [
    pytest.mark.e2e,
    # nginx's certificate is one the test made: not verified, on purpose.
    pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning"),
]

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
SHIPPED = ROOT / "deploy" / "nginx" / "vero-bridge.conf"
SLOW_CLIENTS = 200
SECRET, TOKEN = "nginx-shared-secret", "nginx-webhook-token-5e1f"


def adapt(text: str, replacements: list[tuple[str, str]]) -> str:
    """The shipped file with the machine-specific lines replaced; each must be
    there, so the test runs the shipped file, not a copy of its own."""
    for old, new in replacements:
        assert old in text, f"{old!r} is not in {SHIPPED.name}"
        text = text.replace(old, new)
    return text


@pytest.fixture
def proxied(tmp_path):
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx; .ci/run does)")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificate for the TLS server")
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-subj", "/CN=localhost", "-keyout", str(tmp_path / "key.pem")),
            *("-out", str(tmp_path / "cert.pem")),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db",
        "VERO_AUTH_TOKEN": "nginx-vero-token",
        "SEGMENT_SHARED_SECRET": SECRET,
        "SEGMENT_WRITE_KEY": "nginx-write-key",
        "VERO_WEBHOOK_TOKEN": TOKEN,
        "DELIVERY_IN_WEB": "false",  # nothing to deliver to; the edge is tested
        # As few threads as possible: without nginx, two slow clients would
        # hold every one of them.
        "WEB_CONCURRENCY": "1",
        "GUNICORN_THREADS": "2",
    }
    service = Service(env, tmp_path / "service.log").start()
    tls_port, http_port = free_port(), free_port()
    logs = tmp_path / "nginx-logs"
    logs.mkdir()
    site = adapt(
        SHIPPED.read_text(),
        [
            ("server 127.0.0.1:8000;", f"server 127.0.0.1:{service.port};"),
            ("listen 443 ssl;", f"listen 127.0.0.1:{tls_port} ssl;"),
            ("listen 80;", f"listen 127.0.0.1:{http_port};"),
            ("listen [::]:443 ssl;\n", ""),
            ("listen [::]:80;\n", ""),
            (
                "/etc/letsencrypt/live/bridge.example.com/fullchain.pem",
                str(tmp_path / "cert.pem"),
            ),
            ("/etc/letsencrypt/live/bridge.example.com/privkey.pem", str(tmp_path / "key.pem")),
            ("/var/log/nginx/", f"{logs}/"),
        ],
    )
    (tmp_path / "site.conf").write_text(site)
    temp = "".join(
        f"{kind}_temp_path {tmp_path}/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp_path / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {tmp_path}/nginx.pid;\n"
        + f"error_log {logs}/main-error.log warn;\n"
        + "events { worker_connections 2048; }\n"
        + f"http {{\n{temp}include {tmp_path}/site.conf;\n}}\n"
    )
    nginx = subprocess.Popen(
        [NGINX, "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
        stdout=open(tmp_path / "nginx.out", "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"https://127.0.0.1:{tls_port}"

    def up() -> bool:
        assert nginx.poll() is None, (tmp_path / "nginx.out").read_text()
        try:
            return requests.get(url + "/healthz", verify=False, timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(up, 20, "nginx did not answer")
    try:
        yield url, tls_port, http_port, service, logs
    finally:
        nginx.send_signal(signal.SIGQUIT)
        try:
            nginx.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(nginx.pid, signal.SIGKILL)
        service.stop()
        service.kill()


async def slow_identify(port: int, n: int, pieces: int, pause: float) -> int:
    """One client sending its request a few bytes at a time, as a slow or
    hostile one does; returns the status it was answered with."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    body = json.dumps({"type": "identify", "userId": f"slow-{n}", "traits": {"n": n}}).encode()
    credential = base64.b64encode(f"{SECRET}:".encode()).decode()
    request = (
        f"POST /v1/identify HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {credential}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    step = -(-len(request) // pieces)
    for start in range(0, len(request), step):
        writer.write(request[start : start + step])
        await writer.drain()
        await asyncio.sleep(pause)
    status_line = await reader.readline()
    await reader.read()
    writer.close()
    return int(status_line.split()[1])


async def crowd(port: int) -> tuple[list[int], int]:
    """SLOW_CLIENTS slow clients at once, and an ordinary request among them."""
    clients = [
        asyncio.create_task(slow_identify(port, n, pieces=8, pause=0.25))
        for n in range(SLOW_CLIENTS)
    ]
    await asyncio.sleep(0.5)  # every slow client is mid-request now
    ordinary = await asyncio.to_thread(
        lambda: (
            requests.get(f"https://127.0.0.1:{port}/readyz", verify=False, timeout=10).status_code
        )
    )
    return list(await asyncio.wait_for(asyncio.gather(*clients), 60)), ordinary


def test_behind_nginx_slow_clients_are_all_answered(proxied):
    _, tls_port, _, service, _ = proxied
    statuses, ordinary = asyncio.run(crowd(tls_port))
    assert ordinary == 200  # answered while 200 clients were still sending
    assert statuses == [200] * SLOW_CLIENTS
    # Each arrived whole and was stored: 200 accepted, none refused.
    accepted = re.findall(r'"route": "/v1/<[^"]*>", "status": 200', service.logs())
    assert len(accepted) == SLOW_CLIENTS


def test_nginx_lets_through_what_max_body_bytes_allows_and_no_more(proxied):
    url, *_ = proxied
    limit = 4 * 1024 * 1024  # MAX_BODY_BYTES's default
    start = b'{"type": "identify", "userId": "big", "traits": {"pad": "'
    end = b'"}}'
    at_limit = start + b"x" * (limit - len(start) - len(end)) + end
    answer = requests.post(
        url + "/v1/identify", data=at_limit, auth=(SECRET, ""), verify=False, timeout=30
    )
    # The service's own answer (JSON), not nginx's refusal.
    assert answer.status_code != 413 and "json" in answer.headers["Content-Type"]
    over = requests.post(
        url + "/v1/identify", data=at_limit + b" ", auth=(SECRET, ""), verify=False, timeout=30
    )
    assert over.status_code == 413


def test_no_log_nginx_writes_shows_the_webhook_token(proxied):
    url, _, http_port, service, logs = proxied
    webhook = {"type": "opened", "opened_at": 1, "message_id": "m", "user": {"id": "u"}}
    shapes = [
        f"/vero/webhooks/{TOKEN}",
        f"//VERO/webhooks//{TOKEN}",
        f"/vero/webhooks/{TOKEN}/x?token={TOKEN}",
        f"/healthz?token={TOKEN}",
    ]
    for path in shapes:
        requests.post(url + path, json=webhook, verify=False, timeout=10)
    # Plain http: refused, and not redirected with the path in Location.
    plain = requests.post(
        f"http://127.0.0.1:{http_port}/vero/webhooks/{TOKEN}",
        json=webhook,
        timeout=10,
        allow_redirects=False,
    )
    assert plain.status_code == 403 and TOKEN not in json.dumps(dict(plain.headers))
    # The service down: nginx's errors (502) quote the request line.
    service.stop()
    for path in shapes:
        answer = requests.post(url + path, json=webhook, verify=False, timeout=10)
        assert answer.status_code == 502
    time.sleep(0.2)  # nginx writes its log lines as it answers; let them land
    written = "".join(path.read_text() for path in Path(logs).iterdir())
    assert " POST 502 " in written  # the failures were logged ...
    assert TOKEN not in written  # ... without the token

"""Segment's server libraries, unchanged, with the service as their host
(SERVICE.md: "so Segment's own server libraries can use the service as their
host unchanged"), against the real service under gunicorn and a stand-in Vero.

- The Python libraries themselves: segment-analytics-python and
  analytics-python 1.x, each batching (the default), with gzip=True and in
  sync_mode.
- The Node libraries themselves (@segment/analytics-node, analytics-node),
  installed from npm into a cache under .venv on first use; skipped, saying
  why, where Node or npm is missing or the install fails.
- The others as requests rebuilt from each library's source (path, headers,
  body shape, timestamp format, compression), replayed with `requests`:
  analytics-ruby, analytics-java (old and new), Analytics.NET, analytics-go,
  analytics-php, analytics-rust, and the releases of segment-analytics-python
  and @segment/analytics-node that send the write key only in the body.

Each case must reach Vero as the calls MAPPING.md gives.
"""

from __future__ import annotations

import base64
import fcntl
import gzip
import json
import os
import shutil
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path

import analytics as analytics_1x
import pytest
import requests
from segment.analytics import Client as SegmentClient

from tests.conftest import wait_for
from tests.standin import VERO_BASE_PATH, Upstream
from tests.support import Service

pytestmark = pytest.mark.e2e

SECRET = "clients-shared-secret"
WHEN = datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)
CREATED_AT = 1700000000
NODE_PACKAGES = ("@segment/analytics-node@3.1.0", "analytics-node@6.2.0")
NODE_CACHE = Path(sys.prefix) / "node-clients"


@pytest.fixture(scope="module")
def vero():
    """One stand-in Vero for the module's service (the conftest one is per test)."""
    upstream = Upstream(base_path=VERO_BASE_PATH).start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def service(vero, tmp_path_factory):
    folder = tmp_path_factory.mktemp("clients")
    env = {
        "VERO_AUTH_TOKEN": "clients-vero-token",
        "VERO_API_URL": vero.url,
        "SEGMENT_SHARED_SECRET": SECRET,
        "DATABASE_URL": f"sqlite:///{folder}/outbox.db",
        "WEB_CONCURRENCY": "2",
        "DELIVERY_POLL_SECONDS": "0.05",
    }
    with Service(env, folder / "log") as running:
        yield running
    assert SECRET not in running.logs()


def events_for(vero, user: str) -> list[tuple[str, str, int | None]]:
    """(path, event name or "", created_at) of every Vero call about `user`."""
    calls = []
    for _, path, body in vero.received():
        identity = body.get("identity") or {}
        if body.get("id") == user or identity.get("id") == user:
            calls.append(
                (path, body.get("event_name", ""), body.get("extras", {}).get("created_at"))
            )
    return calls


def wait_for_user(vero, user: str, count: int) -> list:
    return wait_for(lambda: len(events_for(vero, user)) >= count and events_for(vero, user), 30)


def expected_pair(created_at: int | None = CREATED_AT) -> list:
    return [("/users/track", "", None), ("/events/track", "Signed Up", created_at)]


# ---------------------------------------------------------------------------
# The Python libraries themselves


PYTHON_MODES = {
    "default": {},
    "gzip": {"gzip": True},
    "sync_mode": {"sync_mode": True},
}


@pytest.mark.parametrize("library", ["segment-analytics-python", "analytics-python-1.x"])
@pytest.mark.parametrize("mode", PYTHON_MODES)
def test_the_python_libraries_reach_vero(service, vero, library, mode):
    user = f"py-{library}-{mode}-{uuid.uuid4().hex[:6]}"
    errors: list = []
    options = {
        "host": service.url,
        "max_retries": 0,
        "on_error": lambda error, batch: errors.append(error),
        **PYTHON_MODES[mode],
    }
    if library == "segment-analytics-python":
        client = SegmentClient(write_key=SECRET, upload_interval=0.1, **options)
    else:
        client = analytics_1x.Client(SECRET, upload_interval=0.1, **options)

    client.identify(user, {"plan": "pro"}, timestamp=WHEN)
    client.track(user, "Signed Up", {"plan": "pro"}, timestamp=WHEN)
    if mode != "sync_mode":  # sync mode has sent each call already
        client.flush()
        client.join()

    assert errors == []
    assert wait_for_user(vero, user, 2) == expected_pair()


def test_analytics_python_1x_reads_a_refusal_as_final(service, vero):
    """analytics-python 1.x reads `code` and `message` from an error; without
    them a KeyError escaped, which its consumer retried (eleven times by
    default) instead of giving up on a request that cannot succeed."""
    errors: list = []
    batching = analytics_1x.Client(
        "not-the-secret", host=service.url, on_error=lambda error, batch: errors.append(error)
    )
    sync = analytics_1x.Client("not-the-secret", host=service.url, sync_mode=True)

    with pytest.raises(analytics_1x.request.APIError) as raised:
        sync.track("py1-refused", "Signed Up", timestamp=WHEN)
    batching.track("py1-refused", "Signed Up", timestamp=WHEN)
    batching.flush()
    batching.join()

    assert (raised.value.status, raised.value.code) == (401, "unauthorized")
    assert "shared secret" in raised.value.message
    [error] = errors
    assert isinstance(error, analytics_1x.request.APIError) and error.status == 401
    assert events_for(vero, "py1-refused") == []


# ---------------------------------------------------------------------------
# The Node libraries themselves

NODE_SCRIPT = r"""
const [library, host, writeKey, user] = process.argv.slice(2);
const when = new Date("2023-11-14T22:13:20Z");
async function main() {
  if (library === "@segment/analytics-node") {
    const { Analytics } = require("@segment/analytics-node");
    const client = new Analytics({ writeKey, host, maxRetries: 0, flushInterval: 100 });
    const failures = [];
    client.on("error", (error) => failures.push(String(error.reason || error.code || error)));
    client.identify({ userId: user, traits: { plan: "pro" }, timestamp: when });
    client.track({ userId: user, event: "Signed Up", properties: { plan: "pro" }, timestamp: when });
    await client.closeAndFlush({ timeout: 20000 });
    if (failures.length) throw new Error(failures.join("; "));
  } else {
    const Analytics = require("analytics-node");
    let failed = null;
    const client = new Analytics(writeKey, {
      host, flushInterval: 100, retryCount: 0, errorHandler: (error) => { failed = error; },
    });
    client.identify({ userId: user, traits: { plan: "pro" }, timestamp: when });
    client.track({ userId: user, event: "Signed Up", properties: { plan: "pro" }, timestamp: when });
    await new Promise((resolve, reject) =>
      client.flush((error) => (error ? reject(error) : resolve())));
    await new Promise((resolve) => setTimeout(resolve, 300));
    if (failed) throw failed;
  }
}
main().then(() => process.exit(0), (error) => { console.error(String(error)); process.exit(1); });
"""


@pytest.fixture(scope="module")
def node_clients() -> Path:
    """The Node libraries, installed once into .venv (kept between runs)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are not installed: the Node libraries are not tested")
    NODE_CACHE.mkdir(parents=True, exist_ok=True)
    marker = NODE_CACHE / ("installed-" + "-".join(NODE_PACKAGES).replace("/", "_"))
    with open(NODE_CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once install once
        if not marker.exists():
            (NODE_CACHE / "package.json").write_text('{"private": true}')
            done = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", *NODE_PACKAGES],
                cwd=NODE_CACHE,
                capture_output=True,
                text=True,
                timeout=300,
            )
            if done.returncode != 0:
                pytest.skip(
                    f"npm could not install {', '.join(NODE_PACKAGES)}: {done.stderr[-500:]}"
                )
            marker.write_text("ok")
    return NODE_CACHE


@pytest.mark.parametrize("library", ["@segment/analytics-node", "analytics-node"])
def test_the_node_libraries_reach_vero(service, vero, node_clients, tmp_path, library):
    user = f"node-{library.strip('@').replace('/', '-')}-{uuid.uuid4().hex[:6]}"
    script = tmp_path / "send.js"
    script.write_text(NODE_SCRIPT)

    done = subprocess.run(
        ["node", str(script), library, service.url, SECRET, user],
        env={**os.environ, "NODE_PATH": str(node_clients / "node_modules")},
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    calls = wait_for_user(vero, user, 2)
    if library == "analytics-node":
        # Version 6 sends a client's first message alone, at once, and the
        # rest batched: the two requests may arrive in either order.
        assert sorted(calls) == sorted(expected_pair())
    else:
        assert calls == expected_pair()


# ---------------------------------------------------------------------------
# Requests rebuilt from the other libraries' sources


def basic(key: str = SECRET) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


def pair(user: str, timestamp: str, library: dict, typed: bool = True, **extra) -> list[dict]:
    """An identify and a track as a library builds them."""
    common = {"userId": user, "timestamp": timestamp, "context": {"library": library}, **extra}
    identify = {**common, "traits": {"plan": "pro"}, "messageId": str(uuid.uuid4())}
    track = {**common, "event": "Signed Up", "properties": {"plan": "pro"}}
    track["messageId"] = str(uuid.uuid4())
    if typed:
        identify, track = {"type": "identify", **identify}, {"type": "track", **track}
    return [identify, track]


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def rebuilt(user: str) -> dict[str, list[tuple[str, dict, bytes]]]:
    """Per library: the requests it sends for an identify and a track,
    as (path, headers, body)."""
    ruby = {"name": "analytics-ruby", "version": "2.4.0"}
    java = {"name": "analytics-java", "version": "3.5.4"}
    dotnet = {"name": "Analytics.NET", "version": "3.8.1"}
    go = {"name": "analytics-go", "version": "3.3.0"}
    php = {"name": "analytics-php", "version": "3.7.0", "consumer": "LibCurl"}
    rust = {"name": "analytics-rust", "version": "0.2.0"}
    node2 = {"name": "@segment/analytics-node", "version": "2.1.0"}
    py23 = {"name": "analytics-python", "version": "2.3.4"}
    return {
        # lib/segment/analytics/transport.rb: Net::HTTP POST to PATH
        # (/v1/import), Basic auth (key, nil), Accept and Content-Type json,
        # JSON.generate(sentAt, batch); nulls for what was not given.
        "analytics-ruby": [
            (
                "/v1/import",
                {
                    "Accept": "application/json",
                    "Content-Type": "application/json",
                    "Authorization": basic(),
                    "User-Agent": "Ruby",
                },
                compact(
                    {
                        "sentAt": "2023-11-14T22:13:21.000Z",
                        "batch": pair(
                            user,
                            "2023-11-14T22:13:20.000Z",
                            ruby,
                            anonymousId=None,
                            integrations=None,
                            options=None,
                        ),
                    }
                ),
            )
        ],
        # analytics-java 3.4-3.5: Builder.endpoint(host) + "/v1/import/",
        # AnalyticsRequestInterceptor sets only the User-Agent, the Batch
        # carries writeKey; Gson via Retrofit: charset in the Content-Type.
        "analytics-java-3.5": [
            (
                "/v1/import/",
                {
                    "Content-Type": "application/json; charset=UTF-8",
                    "User-Agent": "analytics-java/3.5.4",
                },
                compact(
                    {
                        "batch": pair(user, "2023-11-14T22:13:20.000Z", java),
                        "sentAt": "2023-11-14T22:13:21.000Z",
                        "context": {"library": java},
                        "sequence": 1,
                        "writeKey": SECRET,
                    }
                ),
            )
        ],
        # analytics-java before 3.4 and after 3.5: Basic auth from the
        # interceptor; with the documented gzip interceptor, a gzip body
        # (OkHttp streams it chunked; see test_e2e_framing for that framing).
        "analytics-java-gzip": [
            (
                "/v1/import/",
                {
                    "Content-Type": "application/json; charset=UTF-8",
                    "Content-Encoding": "gzip",
                    "Authorization": basic(),
                    "User-Agent": "analytics-java/3.5.1",
                },
                gzip.compress(
                    compact(
                        {
                            "batch": pair(user, "2023-11-14T22:13:20.000Z", java),
                            "sentAt": "2023-11-14T22:13:21.000Z",
                            "context": {"library": java},
                            "sequence": 2,
                        }
                    )
                ),
            )
        ],
        # Analytics/Request/BlockingRequestHandler.cs: Host + "/v1/import"
        # hard-coded, Basic auth, gzip when SetGzip(true); DateTime "o" has
        # seven fractional digits and an offset; Newtonsoft writes nulls.
        "Analytics.NET": [
            (
                "/v1/import",
                {
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                    "Authorization": basic(),
                    "User-Agent": "Analytics.NET/3.8.1",
                },
                gzip.compress(
                    compact(
                        {
                            "writeKey": SECRET,
                            "batch": pair(
                                user, "2023-11-14T23:13:20.0000000+01:00", dotnet, anonymousId=None
                            ),
                            "context": {"library": dotnet},
                            "messageId": str(uuid.uuid4()),
                            "sentAt": "2023-11-14T23:13:21.0000000+01:00",
                        }
                    )
                ),
            )
        ],
        # analytics.go upload(): Endpoint + "/v1/batch", SetBasicAuth(key,
        # ""), its own User-Agent; time.Time marshals with nanoseconds.
        "analytics-go": [
            (
                "/v1/batch",
                {
                    "Content-Type": "application/json",
                    "Authorization": basic(),
                    "User-Agent": "analytics-go (version: 3.3.0)",
                },
                compact(
                    {
                        "messageId": str(uuid.uuid4()),
                        "sentAt": "2023-11-14T22:13:21.123456789Z",
                        "batch": pair(user, "2023-11-14T22:13:20.000000001Z", go),
                        "context": {"library": go},
                    }
                ),
            )
        ],
        # lib/Consumer/LibCurl.php: https://host/v1/batch, CURLOPT_USERPWD
        # "secret:", gzencode() when compress_request; date('c') times.
        "analytics-php": [
            (
                "/v1/batch",
                {
                    "Content-Type": "application/json",
                    "Content-Encoding": "gzip",
                    "Authorization": basic(),
                    "User-Agent": "analytics-php/3.7.0",
                },
                gzip.compress(
                    json.dumps(
                        {
                            "batch": pair(user, "2023-11-14T22:13:20+00:00", php),
                            "sentAt": "2023-11-14T22:13:21+00:00",
                        }
                    ).encode()
                ),
            )
        ],
        # src/http.rs: host + "/v1/<type>" per message, basic_auth(key,
        # Some("")), .json(msg); an untagged message carries no "type".
        "analytics-rust": [
            (
                f"/v1/{kind}",
                {"Content-Type": "application/json", "Authorization": basic()},
                compact(m),
            )
            for kind, m in zip(
                ("identify", "track"),
                pair(user, "2023-11-14T22:13:20Z", rust, typed=False),
                strict=True,
            )
        ],
        # segment-analytics-python 2.3.0-2.3.4: writeKey in the body, no
        # Authorization header.
        "segment-analytics-python-2.3": [
            (
                "/v1/batch",
                {"Content-Type": "application/json", "User-Agent": "analytics-python/2.3.4"},
                json.dumps(
                    {
                        "batch": pair(user, "2023-11-14T22:13:20+00:00", py23),
                        "sentAt": "2023-11-14T22:13:21+00:00",
                        "writeKey": SECRET,
                    }
                ).encode(),
            )
        ],
        # @segment/analytics-node 2.0.0-3.0.0: JSON.stringify({batch,
        # writeKey, sentAt}), no Authorization header.
        "@segment/analytics-node-2.x": [
            (
                "/v1/batch",
                {"Content-Type": "application/json", "User-Agent": "analytics-node-next/latest"},
                compact(
                    {
                        "batch": pair(user, "2023-11-14T22:13:20.000Z", node2),
                        "writeKey": SECRET,
                        "sentAt": "2023-11-14T22:13:21.000Z",
                    }
                ),
            )
        ],
    }


LIBRARIES = list(rebuilt("x"))


@pytest.mark.parametrize("library", LIBRARIES)
def test_requests_rebuilt_from_each_library_reach_vero(service, vero, library):
    user = f"{library}-{uuid.uuid4().hex[:6]}"
    for path, headers, body in rebuilt(user)[library]:
        answer = requests.post(service.url + path, data=body, headers=headers, timeout=10)
        assert answer.status_code == 200, answer.text
        assert answer.json()["rejected"] == []
        assert answer.headers["Content-Type"] == "application/json"

    assert wait_for_user(vero, user, 2) == expected_pair()


def test_a_wrong_write_key_is_refused_whichever_way_it_is_sent(service, vero):
    user = f"refused-{uuid.uuid4().hex[:6]}"
    body = {"batch": pair(user, "2023-11-14T22:13:20Z", {"name": "x"}), "writeKey": "wrong"}
    for headers in ({}, {"Authorization": basic("wrong")}, {"Authorization": "Bearer wrong"}):
        answer = requests.post(service.url + "/v1/import/", json=body, headers=headers, timeout=10)
        assert answer.status_code == 401
        assert set(answer.json()) == {"error", "code", "message"}
    assert events_for(vero, user) == []


# ---------------------------------------------------------------------------
# Combinations the rows above do not cover


def test_analytics_java_with_the_key_in_the_body_and_its_gzip_interceptor(service, vero):
    """analytics-java 3.4-3.5 (writeKey only, no Authorization) with the
    documented gzip interceptor: OkHttp streams the gzip body chunked, so the
    key is only known once the body is inflated."""
    user = f"java-key-gzip-{uuid.uuid4().hex[:6]}"
    java = {"name": "analytics-java", "version": "3.5.4"}
    body = gzip.compress(
        compact(
            {
                "batch": pair(user, "2023-11-14T22:13:20.000Z", java),
                "sentAt": "2023-11-14T22:13:21.000Z",
                "context": {"library": java},
                "sequence": 3,
                "writeKey": SECRET,
            }
        )
    )
    # A generator body: requests sends it with Transfer-Encoding: chunked.
    chunks = (body[start : start + 64] for start in range(0, len(body), 64))

    answer = requests.post(
        service.url + "/v1/import/",
        data=chunks,
        headers={
            "Content-Type": "application/json; charset=UTF-8",
            "Content-Encoding": "gzip",
            "User-Agent": "analytics-java/3.5.4",
        },
        timeout=10,
    )

    assert answer.status_code == 200, answer.text
    assert answer.json()["accepted"] == 2
    assert wait_for_user(vero, user, 2) == expected_pair()


def test_a_batchs_top_level_context_reaches_vero_in_each_of_its_messages(service, vero):
    """A batch envelope's context applies to each message in it (Segment's
    batch API): analytics-ruby's shape, with the user's email only there and
    each message's own context (its library) kept beside it."""
    user = f"ruby-context-{uuid.uuid4().hex[:6]}"
    ruby = {"name": "analytics-ruby", "version": "2.4.0"}
    body = {
        "sentAt": "2023-11-14T22:13:21.000Z",
        "context": {"traits": {"email": "ruby.user@example.org"}},
        "batch": pair(user, "2023-11-14T22:13:20.000Z", ruby, anonymousId=None),
    }

    answer = requests.post(
        service.url + "/v1/import",
        data=compact(body),
        headers={"Content-Type": "application/json", "Authorization": basic()},
        timeout=10,
    )

    assert answer.status_code == 200, answer.text
    assert wait_for_user(vero, user, 2) == expected_pair()
    emails = {
        path: body.get("email") or body.get("identity", {}).get("email")
        for _, path, body in vero.received()
        if user in (body.get("id"), body.get("identity", {}).get("id"))
    }
    assert emails == {
        "/users/track": "ruby.user@example.org",
        "/events/track": "ruby.user@example.org",
    }

"""Shutdown never hangs and loses nothing, however the platform signals.

Heroku (and a Procfile runner such as honcho) sends SIGTERM to every process
at once, gunicorn's master and workers alike, and may send it again; a second
signal arriving inside the first one's handler once left a worker blocked on
a lock forever. Here every process gets SIGTERM several times, at spacings
from none to a second, while clients keep posting; each time the service
must be gone before gunicorn's graceful timeout (which would kill a stuck
worker), having exited by itself, and every acknowledged message must
arrive upstream once the service runs again.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import requests

from tests.standin import Reply, Upstream
from tests.support import GUNICORN, ROOT, free_port, procfile_line
from tests.test_faults import (
    SHARED_SECRET,
    WEBHOOK_TOKEN,
    delivered,
    segment_attempts,
    service_env,
    vero_attempts,
)

pytestmark = pytest.mark.e2e

# gunicorn.conf.py's graceful_timeout: past it the master kills a worker that
# has not finished, so exiting within it is exiting by itself.
GRACE_SECONDS = 25.0
# Spacings between the SIGTERMs of one shutdown, in seconds.
PATTERNS = [
    [0.0] * 40,  # a burst: the next signal lands inside the previous handler
    [0.0002] * 40,
    [0.001, 0.003, 0.01, 0.05, 0.2, 0.6],
]


def slow_ok(number: int, request) -> Reply:
    # Long enough that deliveries are in flight when the signals come.
    time.sleep(0.02)
    return Reply()


class Load:
    """Clients posting one message at a time to each direction until stopped,
    recording what was acknowledged (200)."""

    def __init__(self, url: str, run: str, clients: int = 4):
        self.url, self.run = url, run
        self.acked: set[tuple[str, int]] = set()
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)
        ]
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(15)

    def _client(self, n: int) -> None:
        user = f"{self.run}-user-{n}"
        seq = 0
        with requests.Session() as session:
            while not self.stopping.is_set() and seq < 2000:
                seq += 1
                track = {"type": "track", "userId": user, "event": "E", "properties": {"seq": seq}}
                webhook = {
                    "type": "opened",
                    "opened_at": 1_700_000_000 + seq,
                    "user": {"id": user},
                    "campaign": {"id": 1},
                    "message_id": f"{self.run}|{user}|{seq}",
                }
                for path, body, auth in (
                    ("/v1/track", {**track, "messageId": f"{user}-{seq}"}, (SHARED_SECRET, "")),
                    (f"/vero/webhooks/{WEBHOOK_TOKEN}", webhook, None),
                ):
                    try:
                        answer = session.post(self.url + path, json=body, auth=auth, timeout=10)
                    except requests.RequestException:
                        time.sleep(0.01)  # stopping: not listening any more
                        continue
                    if answer.status_code == 200:
                        with self._lock:
                            self.acked.add((path[:3], user, seq))

    def count(self) -> int:
        with self._lock:
            return len(self.acked)


def arrived(vero: Upstream, segment: Upstream) -> set:
    """What reached the upstreams, in the shape Load records acknowledgements."""
    at_vero = {("/v1", user, seq) for user, seq in delivered(vero_attempts(vero.snapshot()))}
    at_segment = {
        ("/ve", user, seq) for user, seq in delivered(segment_attempts(segment.snapshot()))
    }
    return at_vero | at_segment


def start(line: str, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A Procfile line as its own process group, as a dyno runs it."""
    return subprocess.Popen(
        ["sh", "-c", procfile_line(line)],
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def ready(url: str, procs: list[subprocess.Popen], logs: list[Path]) -> None:
    """The web answers /readyz and a worker has started delivering."""

    def up() -> bool:
        for proc, log in zip(procs, logs, strict=True):
            assert proc.poll() is None, log.read_text()
        if any("delivery started" not in log.read_text() for log in logs[1:]):
            return False
        try:
            return requests.get(url + "/readyz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_until(up, 30, "not ready")


def terminate_all(groups: list[int], spacing: list[float]) -> None:
    """SIGTERM to every process of each group, once and again."""
    for pause in [0.0, *spacing]:
        time.sleep(pause)
        for group in groups:
            with contextlib.suppress(ProcessLookupError):  # all gone already
                os.killpg(group, signal.SIGTERM)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s")
        time.sleep(0.1)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_repeated_sigterms_under_load_stop_every_process_in_time_and_lose_nothing(
    store, tmp_path, request
):
    vero, segment = Upstream(slow_ok).start(), Upstream(slow_ok).start()
    store_url = (
        f"sqlite:///{tmp_path}/outbox.db"
        if store == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    port = free_port()
    env = {
        "PATH": f"{GUNICORN.parent}:{os.environ['PATH']}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        **service_env(store_url, vero.url, segment.url),
    }
    # On PostgreSQL a separate worker delivers, signalled as well.
    lines = ["web"] if store == "sqlite" else ["web", "worker"]
    if store == "postgres":
        env["DELIVERY_IN_WEB"] = "false"
    url = f"http://127.0.0.1:{port}"
    acked: set = set()
    try:
        for round_, spacing in enumerate(PATTERNS):
            logs = [tmp_path / f"round-{round_}-{line}.log" for line in lines]
            procs = [start(line, env, log) for line, log in zip(lines, logs, strict=True)]
            ready(url, procs, logs)
            with Load(url, f"{uuid.uuid4().hex[:6]}-{round_}") as load:
                wait_until(lambda load=load: load.count() >= 40, 30, "no load")
                terminate_all([proc.pid for proc in procs], spacing)
                for proc, log in zip(procs, logs, strict=True):
                    try:
                        code = proc.wait(GRACE_SECONDS)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        pytest.fail(f"running {GRACE_SECONDS}s after SIGTERM:\n{log.read_text()}")
                    assert code == 0, log.read_text()
            acked |= load.acked
            for log in logs:
                text = log.read_text()
                # Each process ended by itself: none was killed, by gunicorn or a signal.
                for sign in ("SIGKILL", "WORKER TIMEOUT", "was sent SIGTERM"):
                    assert sign not in text, text
                # Nor did one leave a traceback while finalizing (an open
                # connection pool once did, on every PostgreSQL stop).
                assert all(line.startswith("{") for line in text.splitlines()), text
            for proc in procs:  # nothing of the group is left behind
                with pytest.raises(ProcessLookupError):
                    os.killpg(proc.pid, 0)

        # Once more, left alone: everything acknowledged reaches the upstreams.
        logs = [tmp_path / f"drain-{line}.log" for line in lines]
        procs = [start(line, env, log) for line, log in zip(lines, logs, strict=True)]
        ready(url, procs, logs)

        wait_until(
            lambda: arrived(vero, segment) >= acked, 60, "acknowledged messages not all delivered"
        )
        assert {kind for kind, _, _ in acked} == {"/v1", "/ve"}
        terminate_all([proc.pid for proc in procs], [0.0])
        for proc in procs:
            assert proc.wait(GRACE_SECONDS) == 0
    finally:
        for proc in locals().get("procs", []):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        vero.stop()
        segment.stop()


@pytest.mark.postgres
def test_a_quick_stop_after_sigterm_lets_every_worker_finish_its_exit(tmp_path, postgres_url):
    """SIGTERM, then SIGINT (gunicorn's quick stop, and Fly's default signal)
    to every process while the web delivers on PostgreSQL. gunicorn gives its
    workers 2 s after a quick stop, then kills them: a worker already stopping
    delivery must finish that, not be cut short by the second signal (which
    once skipped closing its pool, and the open pool then held the process
    until the kill, in 5 rounds of 8)."""
    vero, segment = Upstream(slow_ok).start(), Upstream(slow_ok).start()
    port = free_port()
    env = {
        "PATH": f"{GUNICORN.parent}:{os.environ['PATH']}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        **service_env(postgres_url, vero.url, segment.url),
    }
    url = f"http://127.0.0.1:{port}"
    acked: set = set()
    proc = None
    try:
        for round_ in range(3):
            log = tmp_path / f"round-{round_}.log"
            proc = start("web", env, log)
            ready(url, [proc], [log])
            with Load(url, f"{uuid.uuid4().hex[:6]}-{round_}") as load:
                wait_until(lambda load=load: load.count() >= 40, 30, "no load")
                os.killpg(proc.pid, signal.SIGTERM)
                time.sleep(0.01)
                os.killpg(proc.pid, signal.SIGINT)
                assert proc.wait(GRACE_SECONDS) == 0, log.read_text()
            acked |= load.acked
            # Each worker exited by itself (a killed one never logs its exit),
            # and the group is gone once the last exit is reaped.
            wait_until(lambda proc=proc: not group_alive(proc.pid), 5, "workers still running")
            text = log.read_text()
            booted = set(re.findall(r"Booting worker with pid: (\d+)", text))
            exited = set(re.findall(r"Worker exiting \(pid: (\d+)\)", text))
            assert booted and booted <= exited, text
            assert all(line.startswith("{") for line in text.splitlines()), text

        log = tmp_path / "drain.log"
        proc = start("web", env, log)
        ready(url, [proc], [log])

        wait_until(
            lambda: arrived(vero, segment) >= acked, 60, "acknowledged messages not all delivered"
        )
        terminate_all([proc.pid], [0.0])
        assert proc.wait(GRACE_SECONDS) == 0
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        vero.stop()
        segment.stop()


# Past this a run is certainly stuck: gunicorn's master kills a worker that
# has not exited 25 s after a quick stop, and then exits itself.
STUCK_SECONDS = 40.0


@pytest.mark.parametrize("first", ["SIGINT", "SIGQUIT"], ids=["group SIGINT", "master SIGINT"])
def test_a_quick_stop_while_the_main_loop_holds_the_pool_lock_lets_the_worker_exit(first, tmp_path):
    """A signal handler runs on the main thread wherever it was interrupted,
    and gthread's main loop holds its thread pool's lock whenever it hands a
    connection over. gthread's quick stop shut the pool down, under that
    lock, inside the handler: a stop arriving then waited for itself until
    the master killed the worker (3 quick stops of 140 under load took the
    25 s of the graceful timeout). tests/gunicorn_stop_in_submit.py sends the
    stop at exactly that moment: SIGINT to the worker as a platform's SIGINT
    to the group does, or the SIGQUIT that follows a SIGINT to the master;
    the master sends SIGQUIT after either. Every worker must log its own
    exit, which a killed one never does."""
    vero, segment = Upstream(slow_ok).start(), Upstream(slow_ok).start()
    port = free_port()
    armed = tmp_path / "armed"
    env = {
        "PATH": f"{GUNICORN.parent}:{os.environ['PATH']}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STOP_IN_SUBMIT_ARMED": str(armed),
        "STOP_IN_SUBMIT_SIGNAL": first,
        **service_env(f"sqlite:///{tmp_path}/outbox.db", vero.url, segment.url),
    }
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "web.log"
    proc = subprocess.Popen(
        ["sh", "-c", procfile_line("web") + " -c tests/gunicorn_stop_in_submit.py"],
        cwd=ROOT,
        env=env,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        ready(url, [proc], [log])
        armed.touch()
        with Load(url, uuid.uuid4().hex[:6]):
            try:
                code = proc.wait(STUCK_SECONDS)
            except subprocess.TimeoutExpired:
                pytest.fail(f"running {STUCK_SECONDS}s after the quick stop:\n{log.read_text()}")
        wait_until(lambda: not group_alive(proc.pid), 5, "workers still running")
        text = log.read_text()
        assert code == 0, text
        assert "Handling signal: int" in text, text  # the stop came from inside submit
        booted = set(re.findall(r"Booting worker with pid: (\d+)", text))
        exited = set(re.findall(r"Worker exiting \(pid: (\d+)\)", text))
        killed = booted - exited
        assert booted and not killed, f"worker(s) {sorted(killed)} killed, not exited:\n{text}"
        assert "SIGKILL" not in text, text
        assert all(line.startswith("{") for line in text.splitlines()), text
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        vero.stop()
        segment.stop()

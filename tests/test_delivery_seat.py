"""One delivering process per server (service/delivery_seat.py): the seat is
exclusive and freed with its holder, the doorbell reaches it, and under
gunicorn exactly one worker delivers, serves nothing, and is replaced when it
dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
import uuid

import pytest
import requests

from service import delivery_seat
from tests.standin import Upstream
from tests.support import GUNICORN, ROOT, Service, free_port
from tests.test_shutdown import wait_until

pytestmark = pytest.mark.skipif(
    not delivery_seat.SUPPORTED, reason="the delivery seat needs Linux's abstract sockets"
)

SECRET = "seat-shared-secret"


def a_master_pid() -> int:
    # Any number no real master has here, different for each test run.
    return 4_000_000_000 + uuid.uuid4().int % 100_000_000


def test_one_process_holds_a_servers_seat_until_it_lets_go():
    master = a_master_pid()
    seat = delivery_seat.take(master)
    assert seat is not None
    assert delivery_seat.take(master) is None
    other = delivery_seat.take(master + 1)  # another server's seat is its own
    assert other is not None
    other.close()
    seat.close()
    again = delivery_seat.take(master)
    assert again is not None
    again.close()


def test_the_doorbell_wakes_the_holder_with_the_direction():
    master = a_master_pid()
    seat = delivery_seat.take(master)
    assert seat is not None
    rung: list[str] = []
    heard = threading.Event()
    stopping = threading.Event()

    def wake(direction: str) -> None:
        rung.append(direction)
        heard.set()

    delivery_seat.answer(seat, wake, stopping)
    bell = delivery_seat.Doorbell(master)
    try:
        bell.ring("segment_to_vero")
        assert heard.wait(10), "the ring did not arrive"
        assert rung == ["segment_to_vero"]
    finally:
        stopping.set()
        bell.close()
    # The answering thread closes the seat as it ends: it becomes free.
    wait_until(lambda: _free(master), 10, "the seat was not freed")


def test_ringing_with_nobody_in_the_seat_is_silent():
    bell = delivery_seat.Doorbell(a_master_pid())
    for _ in range(1000):  # more than any socket queue holds
        bell.ring("vero_to_segment")
    bell.close()


def test_a_free_seat_goes_to_a_watcher_only_after_the_grace(monkeypatch):
    monkeypatch.setattr(delivery_seat, "VACANCY_SECONDS", 0.05)
    monkeypatch.setattr(delivery_seat, "SUCCESSOR_GRACE_SECONDS", 0.5)
    master = a_master_pid()
    holder = delivery_seat.take(master)
    assert holder is not None
    taken: list = []
    stopping = threading.Event()
    delivery_seat.watch_for_vacancy(master, taken.append, stopping)
    try:
        time.sleep(0.3)
        assert not taken  # held all along
        holder.close()
        # A successor that takes the seat within the grace keeps it.
        successor = delivery_seat.take(master)
        assert successor is not None
        time.sleep(1.0)
        assert not taken
        successor.close()
        wait_until(lambda: bool(taken), 10, "the watcher did not take the free seat")
        assert delivery_seat.take(master) is None  # the watcher holds it now
    finally:
        stopping.set()
        for seat in taken:
            seat.close()


def _free(master: int) -> bool:
    seat = delivery_seat.take(master)
    if seat is None:
        return False
    seat.close()
    return True


def service_env(outbox, vero_url: str) -> dict[str, str]:
    """Direction A on a SQLite outbox, delivering to `vero_url`."""
    return {
        "DATABASE_URL": f"sqlite:///{outbox}",
        "VERO_AUTH_TOKEN": "seat-vero-token",
        "VERO_API_URL": vero_url,
        "SEGMENT_SHARED_SECRET": SECRET,
    }


def deliverers(log: str) -> list[int]:
    return [int(pid) for pid in re.findall(r"Worker (\d+) delivers and serves no requests", log)]


def test_under_gunicorn_one_extra_worker_delivers_woken_at_once_and_is_replaced(tmp_path):
    vero = Upstream().start()
    env = {
        **service_env(tmp_path / "outbox.db", vero.url),
        "WEB_CONCURRENCY": "2",
        # Longer than any wait below: only the doorbell delivers in time.
        "DELIVERY_POLL_SECONDS": "60",
    }
    try:
        with Service(env, tmp_path / "service.log") as service:
            wait_until(lambda: len(deliverers(service.logs())) == 1, 30, "no delivering worker")
            wait_until(lambda: "delivery started" in service.logs(), 30, "delivery not started")
            time.sleep(0.5)  # its first claim, of nothing, is behind it

            def identify(user: str) -> None:
                for _ in range(5):  # several, so each serving worker takes some
                    answer = requests.post(
                        service.url + "/v1/identify",
                        json={"userId": user, "messageId": uuid.uuid4().hex},
                        auth=(SECRET, ""),
                        timeout=5,
                    )
                    assert answer.status_code == 200, answer.text

            def arrived(user: str) -> int:
                return sum(r.json["id"] == user for r in vero.snapshot())

            identify("first")
            wait_until(lambda: arrived("first") == 5, 15, "the doorbell did not wake delivery")
            logs = service.logs()
            assert logs.count("Booting worker with pid") == 3  # two serve, one delivers
            assert logs.count('"delivery started"') == 1

            # The deliverer dies; gunicorn's replacement takes the seat.
            (first,) = deliverers(logs)
            os.kill(first, signal.SIGKILL)
            wait_until(lambda: len(deliverers(service.logs())) == 2, 30, "no successor")
            second = deliverers(service.logs())[1]
            assert second != first
            time.sleep(0.5)
            identify("second")
            wait_until(lambda: arrived("second") == 5, 15, "the successor did not deliver")
    finally:
        vero.stop()


def test_a_server_of_one_worker_serves_and_delivers(tmp_path):
    # gunicorn's own options (the web line passes them on, as does
    # GUNICORN_CMD_ARGS) override gunicorn.conf.py's count, one more than
    # WEB_CONCURRENCY: the only worker must not stop serving to deliver.
    vero = Upstream().start()
    env = service_env(tmp_path / "outbox.db", vero.url)
    try:
        with Service(env, tmp_path / "service.log", args=("--workers", "1")) as service:
            answer = requests.post(
                service.url + "/v1/identify",
                json={"userId": "alone", "messageId": uuid.uuid4().hex},
                auth=(SECRET, ""),
                timeout=5,
            )
            assert answer.status_code == 200, answer.text
            wait_until(lambda: len(vero.snapshot()) == 1, 15, "the only worker did not deliver")
            assert not deliverers(service.logs())
    finally:
        vero.stop()


def _in_own_pid_namespace(command: list[str]) -> list[str]:
    # As in a container: the server's master is pid 1 of its own namespace.
    return ["unshare", "--pid", "--fork", "--mount-proc", *command]


def _unshare_works() -> bool:
    try:
        return subprocess.run(_in_own_pid_namespace(["true"]), timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_servers_whose_masters_share_a_pid_each_deliver(tmp_path):
    """Containers on one network namespace (host networking, a pod) see the
    same abstract socket names, and each container's master has the same pid:
    each server still has a seat of its own, and delivers its own outbox."""
    if not _unshare_works():
        pytest.skip("needs unshare(1) and the right to make pid namespaces")
    vero = Upstream().start()
    servers: list[tuple[subprocess.Popen, str]] = []
    try:
        for number in range(2):
            port = free_port()
            env = {
                "PATH": os.environ["PATH"],
                **service_env(tmp_path / f"outbox-{number}.db", vero.url),
                "WEB_CONCURRENCY": "1",
            }
            command = [str(GUNICORN), "wsgi:app", "--bind", f"127.0.0.1:{port}"]
            with open(tmp_path / f"service-{number}.log", "ab") as log:
                proc = subprocess.Popen(
                    _in_own_pid_namespace(command),
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            servers.append((proc, f"http://127.0.0.1:{port}"))

        def logs(number: int) -> str:
            return (tmp_path / f"service-{number}.log").read_text(errors="replace")

        for number, (_, url) in enumerate(servers):
            wait_until(lambda url=url: _answers(url), 30, f"server {number} did not answer")
            wait_until(
                lambda number=number: bool(deliverers(logs(number))),
                30,
                f"server {number} has no deliverer",
            )
            answer = requests.post(
                url + "/v1/identify",
                json={"userId": f"server-{number}", "messageId": uuid.uuid4().hex},
                auth=(SECRET, ""),
                timeout=5,
            )
            assert answer.status_code == 200, answer.text

        def users() -> list[str]:
            return sorted(received.json["id"] for received in vero.snapshot())

        wait_until(lambda: users() == ["server-0", "server-1"], 15, "a server did not deliver")
    finally:
        for proc, _ in servers:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in servers:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        vero.stop()


def _answers(url: str) -> bool:
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except (requests.ConnectionError, requests.Timeout):
        return False

"""One delivering process per server, and how the serving processes wake it.

With DELIVERY_IN_WEB on, gunicorn.conf.py runs one worker more than serve
requests. The first worker to take its server's seat delivers and serves
nothing; the others serve and deliver nothing. Delivering in every serving
worker put a window of sender threads beside each worker's request threads,
under one GIL: a request waited behind the senders after every read, commit
and write, and ingest fell to about half while a backlog drained
(bench/RESULTS.md). Apart, the two share only the cores.

The seat is a Unix datagram socket in Linux's abstract namespace, named after
the master's pid and pid namespace, so each server (and each test's server)
has its own:
- binding the name succeeds for one process only, and the kernel frees it
  when that process ends, however it ends: no lock file to clean up;
- the same socket receives the doorbell the serving workers ring after each
  write, so new work leaves at once, not at the next poll.

A serving worker that finds the seat left free (its holder stopped during a
reload, SIGHUP, and no new worker took it) takes it and delivers beside
serving, so a server is never left without delivery. Where there is no abstract namespace (macOS, for
development), every worker delivers, as before.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

SUPPORTED = sys.platform.startswith("linux")
# How often a serving worker looks whether the seat has come free, and how
# long it leaves a free seat to a newly started worker (watch_for_vacancy).
VACANCY_SECONDS = 1.0
SUCCESSOR_GRACE_SECONDS = 5.0


def _address(master_pid: int) -> bytes:
    # A pid alone names a process only within its pid namespace, and
    # containers sharing a network namespace (host networking, a pod) share
    # the abstract names while each one's master has the same pid: with the
    # namespace in the name, each server has a seat of its own.
    return b"\0vero-bridge-delivery-%d-%d" % (_pid_namespace(), master_pid)


def _pid_namespace() -> int:
    """The inode of this process's pid namespace, which its master shares
    (0 where /proc does not say)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def take(master_pid: int) -> socket.socket | None:
    """The seat of the server whose master is `master_pid`, or None while
    another process holds it."""
    seat = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        seat.bind(_address(master_pid))
    except OSError as exc:
        seat.close()
        if exc.errno == errno.EADDRINUSE:
            return None
        raise  # abstract sockets refused (a sandbox): not a seat held by another
    return seat


class Doorbell:
    """Rung by a serving worker when work for a direction was written."""

    def __init__(self, master_pid: int):
        self._address = _address(master_pid)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def ring(self, direction: str) -> None:
        # Failing means nobody holds the seat this moment (its next holder
        # looks in the store as it starts), or its queue is full: it is awake.
        with contextlib.suppress(OSError):
            self._socket.sendto(direction.encode(), self._address)

    def close(self) -> None:
        self._socket.close()


def answer(seat: socket.socket, wake: Callable[[str], None], stopping: threading.Event) -> None:
    """Start a thread that passes each ring of the doorbell to `wake`, until
    `stopping` is set. The thread owns the seat: it closes it when it ends."""
    seat.settimeout(VACANCY_SECONDS)

    def loop() -> None:
        with seat:
            while not stopping.is_set():
                try:
                    direction = seat.recv(64)
                except TimeoutError:
                    continue
                except OSError as exc:
                    log.warning("the delivery doorbell failed; delivery polls instead: %s", exc)
                    return
                wake(direction.decode(errors="replace"))

    threading.Thread(target=loop, name="doorbell", daemon=True).start()


def watch_for_vacancy(
    master_pid: int, on_taken: Callable[[socket.socket], None], stopping: threading.Event
) -> None:
    """Start a thread that takes the seat once it has been free for
    SUCCESSOR_GRACE_SECONDS and hands it to `on_taken`, unless `stopping` is
    set first. The grace leaves the seat of a worker that died to the worker
    gunicorn starts in its place, which serves nothing; only a seat no new
    worker takes (a reload's) goes to a serving worker."""

    def loop() -> None:
        vacant_since = None
        while not stopping.wait(VACANCY_SECONDS):
            try:
                seat = take(master_pid)
            except OSError:
                continue
            if seat is None:
                vacant_since = None
                continue
            now = time.monotonic()
            vacant_since = vacant_since or now
            if now - vacant_since < SUCCESSOR_GRACE_SECONDS:
                seat.close()  # only looked
                continue
            on_taken(seat)
            return

    threading.Thread(target=loop, name="delivery-seat", daemon=True).start()

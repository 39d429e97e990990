"""What gunicorn.conf.py needs from the service: the metrics folder of one
server's life, and a worker whose error pages never echo a secret.

Kept apart from gunicorn.conf.py so that it can be imported (by gunicorn, as
the worker class, and by tests) and read without gunicorn's settings.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

from gunicorn.workers.gthread import ThreadWorker

PREFIX = "vero-bridge-metrics-"
# Set beside PROMETHEUS_MULTIPROC_DIR when this module made the folder: the
# master's pid, so that only the server that made it removes it.
OWNER = "VERO_BRIDGE_METRICS_OWNER"
# Folders of releases before the pid was part of the name; nothing tells
# whether one is in use, so only one left alone this long is removed.
LEGACY_STALE_SECONDS = 24 * 3600

_OURS = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")


def metrics_folder(environ: dict[str, str] | None = None) -> str:
    """The folder prometheus_client's multiprocess mode keeps its counters
    in: one an operator set is used as it is; otherwise one of this server's
    own in the temporary folder, named by the master's pid, after removing
    folders whose servers are gone. Sets both variables in `environ`."""
    env = os.environ if environ is None else environ
    given = env.get("PROMETHEUS_MULTIPROC_DIR")
    owner = env.get(OWNER)
    if given and not owner:
        return given  # the operator's: theirs to keep
    if given and owner == str(os.getpid()):
        return given  # this master reading its settings again (SIGHUP)
    # None yet, or one inherited from the master that started this one (a
    # SIGUSR2 upgrade): that master removes its own when it stops.
    remove_stale(tempfile.gettempdir())
    folder = tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")
    env["PROMETHEUS_MULTIPROC_DIR"] = folder
    env[OWNER] = str(os.getpid())
    return folder


def remove_own(environ: dict[str, str] | None = None) -> None:
    """At the server's exit: remove the folder if this process made it."""
    env = os.environ if environ is None else environ
    folder = env.get("PROMETHEUS_MULTIPROC_DIR")
    if folder and env.get(OWNER) == str(os.getpid()):
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale(
    parent: str,
    alive: Callable[[int], bool] | None = None,
    now: float | None = None,
) -> list[str]:
    """Remove the metrics folders in `parent` whose server has stopped."""
    alive = alive or _alive
    now = time.time() if now is None else now
    removed = []
    for name in os.listdir(parent):
        if not name.startswith(PREFIX):
            continue
        path = os.path.join(parent, name)
        match = _OURS.match(name)
        try:
            if match:
                stale = not alive(int(match.group(1)))
            else:
                stale = now - os.stat(path).st_mtime > LEGACY_STALE_SECONDS
            if stale and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue  # another server's, or removed meanwhile
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def ignore_further_stops() -> None:
    """For a process that is exiting already. Python restores the default
    action of signals it handled while it finalizes, so a platform's repeated
    SIGTERM arriving then would turn a clean exit into death by signal; and a
    stop's handler has nothing left to tell a worker that is already on its
    way out (its wake-up would write to a pipe the loop has closed). Whoever
    waits still bounds the exit: gunicorn's master kills a worker after
    graceful_timeout (2 s after a quick stop that follows a SIGTERM)."""
    sys.unraisablehook = _quiet_about_ignored_stops
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(stop, signal.SIG_IGN)


def _quiet_about_ignored_stops(unraisable) -> None:
    # A stop that arrived just before it was ignored, and whose Python handler
    # had not run yet, is reported by Python as "Signal 15 ignored due to race
    # condition" on stderr: a line outside the JSON log, about a signal meant
    # to be ignored. Everything else goes to Python's own hook.
    value = getattr(unraisable, "exc_value", None)
    if isinstance(value, OSError) and "ignored due to race condition" in str(value):
        return
    sys.__unraisablehook__(unraisable)


class Worker(ThreadWorker):
    """gunicorn's threaded worker, except that the page it answers a
    malformed request with (a 400 quoting the request line or header) is
    redacted as a log line is: the line may carry a webhook token; that a
    quick stop only sets flags in its handler, and is carried out by the main
    loop; and that the worker holding the delivery seat serves no requests."""

    quitting = False
    # False on the worker that holds its server's delivery seat, unless it is
    # the only worker (service/delivery_seat.py; set by gunicorn.conf.py's
    # post_worker_init).
    serves = True

    def handle_error(self, req, client, addr, exc):
        super().handle_error(req, client, addr, _redacted(exc))

    def handle_quit(self, sig, frame):
        # A handler runs on the main thread wherever that was interrupted.
        # gthread's shut the thread pool down under the pool's lock and then
        # exited from inside the handler; but the main loop holds that lock
        # whenever it hands a connection to the pool, and a stop arriving
        # then waited for itself until the master killed the worker 25 s
        # later (4 quick stops of 140 under load). So only flags here, and a
        # wake-up for the loop as gthread's SIGTERM handler sends (a
        # SimpleQueue put and a pipe write: nothing that waits). A second
        # stop inside this one does the same again, harmlessly.
        self.alive = False
        self.quitting = True
        self.method_queue.defer(_nothing)

    def wait_for_and_dispatch_events(self, timeout):
        # The main loop's one place of waiting, in the request loop and in
        # the drain after it: a quick stop is noticed here, on the loop.
        if not self.quitting:
            super().wait_for_and_dispatch_events(timeout)
        if self.quitting:
            self._quit()

    def _quit(self):
        """What gthread's quick stop did in its handler, on the main loop:
        no more work for the pool, then exit without waiting for open
        connections (gunicorn's worker_exit hook still runs)."""
        self.tpool.shutdown(wait=False)
        sys.exit(0)

    def run(self):
        try:
            if self.serves:
                super().run()
            else:
                self._only_deliver()
        finally:
            if self.quitting:  # also when the loop had nothing left to wait for
                self.cfg.worker_int(self)

    def _only_deliver(self):
        # Connections are left to the serving workers: this one only shows
        # the master it is alive until told to stop (or orphaned).
        for listener in self.sockets:
            listener.close()
        self.log.info("Worker %s delivers and serves no requests", self.pid)
        while self.alive and self.ppid == os.getppid():
            self.notify()
            time.sleep(1.0)


def _nothing() -> None:
    """The wake-up's callback: waking the loop is all it is for."""


def _redacted(exc: BaseException) -> BaseException:
    """`exc`, or a copy of the same class whose text is redacted. gunicorn's
    request errors build their text from their attributes."""
    from service.logs import redact

    def clean(value):
        return redact(value) if isinstance(value, str) else value

    attributes = {name: clean(value) for name, value in vars(exc).items()}
    args = tuple(clean(arg) for arg in exc.args)
    if attributes == vars(exc) and args == exc.args:
        return exc
    copy = type(exc).__new__(type(exc))
    copy.__dict__.update(attributes)
    copy.args = args
    return copy

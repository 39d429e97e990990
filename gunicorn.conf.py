"""gunicorn settings, read by `gunicorn wsgi:app` from the working directory.

The relay is I/O-bound: a request waits on the outbox's commit, and delivery
threads wait on Vero and Segment. So: one process per core (WEB_CONCURRENCY,
which Heroku and others set, overrides) for the CPU-bound part (JSON, mapping),
and threads in each (gthread, GUNICORN_THREADS) to overlap the waiting. Each
worker process also runs the delivery threads when DELIVERY_IN_WEB is on (the
default).
"""

import os
import signal

from gunicorn import glogging

from service import delivery_seat, logs, serving
from service.config import load_or_exit

# Fail once, in the master, with one line naming the variable.
_config = load_or_exit()
# gunicorn's own lines (access, errors, a malformed request line) are
# redacted like the service's.
logs.use_secrets(_config.secrets)

# prometheus_client picks its multiprocess mode when first imported, so the
# folder must exist before any worker imports the app. It is this server's
# own, removed when the server stops (on_exit) and, should the server be
# killed instead, by the next one to start.
serving.metrics_folder()
from prometheus_client import multiprocess  # noqa: E402  (needs the folder set)

_host = _config.host
bind = [
    f"[{_host}]:{_config.port}" if ":" in _host and "[" not in _host else f"{_host}:{_config.port}"
]
# One more when the web line delivers: that one only delivers (service/delivery_seat.py).
workers = (_config.web_concurrency or os.cpu_count() or 2) + (
    1 if _config.delivery_in_web and delivery_seat.SUPPORTED else 0
)
# gunicorn's gthread worker, with error pages redacted (see service/serving.py).
worker_class = "service.serving.Worker"
threads = _config.gunicorn_threads
timeout = 30
# SIGTERM: stop claiming, finish or release deliveries in flight, then exit.
# Less than the 30 s a platform waits before its SIGKILL (Heroku, Fly's
# kill_timeout, Render), so gunicorn's own deadline always comes first.
graceful_timeout = 25
keepalive = 5
# gunicorn 27's control socket lives at one fixed path per user, which several
# instances on one host would fight over; nothing here uses it.
control_socket_disable = True

logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "service.logs.JsonFormatter"}},
    "handlers": {
        "stdout": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stdout",
            "formatter": "json",
        }
    },
    "root": {"level": _config.log_level, "handlers": []},
    "loggers": {
        "gunicorn.error": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
        "gunicorn.access": {"level": "INFO", "handlers": ["stdout"], "propagate": False},
    },
}


class Logger(glogging.Logger):
    """gunicorn's access line only when an operator asks (--access-logfile).

    The service writes its own access line, with the route rather than the
    raw path (which carries the webhook token); a second line per request
    would only cost time. When asked for, gunicorn's line is redacted too."""

    def access(self, resp, req, environ, request_time):
        if self.cfg.accesslog:
            super().access(resp, req, environ, request_time)


logger_class = Logger
# gunicorn's default access line logs the Basic auth user name (%(u)s), which
# on direction A is SEGMENT_SHARED_SECRET: leave it out ("-" in its place).
access_log_format = '%(h)s %(l)s - %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


def on_starting(server):
    directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(directory):
        if name.endswith(".db"):
            os.remove(os.path.join(directory, name))


def on_exit(server):
    serving.remove_own()
    serving.ignore_further_stops()


def post_worker_init(worker):
    from service.runtime import get_runtime

    runtime = get_runtime(worker.wsgi)
    if not runtime.config.delivery_in_web:
        return
    # gunicorn's own SIGTERM handler only ends the request loop; stop claiming
    # new work at the same moment so the drain fits in graceful_timeout.
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        runtime.deliverer.request_stop()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    if not delivery_seat.SUPPORTED:
        runtime.start_delivery()
        return
    try:
        seat = delivery_seat.take(worker.ppid)
    except OSError as exc:
        worker.log.warning(
            "Worker %s cannot use a delivery seat (%s): every worker delivers", worker.pid, exc
        )
        runtime.start_delivery()
        return
    runtime.ring = delivery_seat.Doorbell(worker.ppid).ring
    if seat is not None:
        # gunicorn's own --workers (or GUNICORN_CMD_ARGS) overrides the count
        # above: a lone worker that stopped serving would leave none.
        worker.serves = worker.cfg.workers < 2
        runtime.start_delivery(seat)
    else:

        def deliver_too(seat):
            if runtime.deliverer.stop_requested:  # the holder left because the server stops
                seat.close()
                return
            worker.log.info("Worker %s took the free delivery seat: it delivers too", worker.pid)
            runtime.start_delivery(seat)

        delivery_seat.watch_for_vacancy(worker.ppid, deliver_too, runtime.deliverer.stopping)


def worker_exit(server, worker):
    from service.runtime import get_runtime

    # First: a further signal (a repeated SIGTERM, a quick stop) has nothing
    # left to do, and once Python finalizes its default action would kill
    # the exit (see ignore_further_stops).
    serving.ignore_further_stops()
    wsgi = getattr(worker, "wsgi", None)
    if wsgi is not None:
        runtime = get_runtime(wsgi)
        runtime.stop_delivery(timeout=20)
        # Now, not when the interpreter finalizes: a PostgreSQL pool left
        # open then waits 5 s for its threads and prints two tracebacks.
        runtime.store.close()


def child_exit(server, worker):
    multiprocess.mark_process_dead(worker.pid)

"""gunicorn.conf.py, plus the worst moment for a quick stop, made certain.

For tests/test_shutdown.py: `python -m service.web -c tests/gunicorn_stop_in_submit.py`.
Once the file named by STOP_IN_SUBMIT_ARMED exists, the first time a worker's
main loop hands a connection to its thread pool it sends, while it holds the
pool's lock inside `submit`, the signal named by STOP_IN_SUBMIT_SIGNAL to
itself and SIGINT to the master: a platform's SIGINT to the whole group
(SIGINT), or the SIGQUIT the master sends after a SIGINT of its own (SIGQUIT).
The master then sends SIGQUIT to every worker. A handler that took that lock
waited for itself until the master killed the worker.
"""

import os
import signal
import threading
from pathlib import Path

_conf = Path(__file__).resolve().parent.parent / "gunicorn.conf.py"
exec(compile(_conf.read_text(), str(_conf), "exec"))

_post_worker_init = post_worker_init  # noqa: F821  (defined by gunicorn.conf.py)


class StopWhileHeld:
    """The pool's own lock; see the module's docstring."""

    def __init__(self, lock, signum: int, armed: str):
        self._lock = lock
        self._signum = signum
        self._armed = armed
        self._sent = False

    def __enter__(self):
        self._lock.acquire()
        if (
            not self._sent
            and threading.current_thread() is threading.main_thread()
            and os.path.exists(self._armed)
        ):
            self._sent = True
            os.kill(os.getppid(), signal.SIGINT)
            signal.raise_signal(self._signum)  # handled before this returns
        return self

    def __exit__(self, *exc):
        self._lock.release()


def post_worker_init(worker):
    _post_worker_init(worker)
    signum = signal.Signals[os.environ["STOP_IN_SUBMIT_SIGNAL"]]
    pool = worker.tpool
    pool._shutdown_lock = StopWhileHeld(
        pool._shutdown_lock, signum, os.environ["STOP_IN_SUBMIT_ARMED"]
    )

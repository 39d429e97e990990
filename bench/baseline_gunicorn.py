"""gunicorn settings for the ingest baseline: every setting of the project's
gunicorn.conf.py (workers, worker class, threads, timeouts, keep-alive,
logging, logger class) except its hooks, which expect the service's app, and
the bind, which the benchmark gives."""

import os
import runpy

from gunicorn.config import KNOWN_SETTINGS

HOOKS = {"on_starting", "post_worker_init", "worker_exit", "child_exit"}
_names = {setting.name for setting in KNOWN_SETTINGS} - HOOKS - {"bind"}
_settings = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "gunicorn.conf.py"))
globals().update({name: value for name, value in _settings.items() if name in _names})

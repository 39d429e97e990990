"""gunicorn settings for the ingest baseline: the process settings of the
project's gunicorn.conf.py (workers, worker class, threads, timeouts, keep-alive,
logging), without its hooks, which expect the service's app."""
import os
import runpy

_settings = runpy.run_path(os.path.join(os.path.dirname(__file__), "..", "gunicorn.conf.py"))

workers = _settings["workers"]
worker_class = _settings["worker_class"]
threads = _settings["threads"]
timeout = _settings["timeout"]
graceful_timeout = _settings["graceful_timeout"]
keepalive = _settings["keepalive"]
logconfig_dict = _settings["logconfig_dict"]

"""`python -m service.web [gunicorn options]`: the Procfile's web process.

It is gunicorn (`gunicorn wsgi:app`, reading gunicorn.conf.py), started only
after every setting has been checked: gunicorn reads WEB_CONCURRENCY while it
is being imported and stops with a traceback when the value is not a number,
before its configuration file could say so in one line.
"""

from __future__ import annotations

import os
import sys
import sysconfig

from service.config import load_or_exit


def main() -> None:
    load_or_exit()
    from gunicorn.app.wsgiapp import run

    # As if started by gunicorn's own script: an upgrade on SIGUSR2 starts
    # the new master with these arguments.
    script = os.path.join(sysconfig.get_path("scripts"), "gunicorn")
    sys.argv = [script, "wsgi:app", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()

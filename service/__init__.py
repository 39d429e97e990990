"""Vero Bridge: everything behind the HTTP edge.

Kept free of imports on purpose: gunicorn's master loads `service.logs` before
it forks, and must not import prometheus_client before its multiprocess
directory is set (see gunicorn.conf.py).
"""

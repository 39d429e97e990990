"""The service as deployed: gunicorn started from the repository root with only
the environment SERVICE.md names."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import requests

from blueprints.ops import NOT_READY
from tests.support import GUNICORN, ROOT, Service, free_port, metric, procfile_line, scrape

pytestmark = pytest.mark.e2e


def test_gunicorn_serves_health_readiness_and_metrics(tmp_path):
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db"}
    with Service(env, tmp_path / "log") as service:
        assert requests.get(service.url + "/healthz", timeout=5).json() == {"status": "ok"}
        assert requests.get(service.url + "/readyz", timeout=5).json() == {"status": "ready"}
        assert requests.get(service.url + "/metrics", timeout=5).status_code == 200
        pending = metric(
            scrape(service.url),
            "vero_bridge_outbox_items",
            direction="segment_to_vero",
            state="pending",
        )
        assert pending == 0
        # Both directions unconfigured: 503, counted in whichever worker answered.
        for _ in range(4):
            assert requests.post(service.url + "/segment", json={}, timeout=5).status_code == 503
        rejected = metric(
            scrape(service.url),
            "vero_bridge_messages_rejected_total",
            direction="segment_to_vero",
            reason="not_configured",
        )
        assert rejected == 4
    assert service.proc.returncode == 0
    lines = service.logs().splitlines()
    entries = [json.loads(line) for line in lines if line.startswith("{")]
    assert entries, "no JSON log lines"
    assert all(line.startswith("{") for line in lines), "every log line is JSON"
    access = [entry for entry in entries if entry["logger"] == "vero_bridge.access"]
    assert {entry["route"] for entry in access} >= {"/healthz", "/readyz", "/metrics", "/segment"}
    assert all(entry.get("request_id") for entry in access)


def test_the_default_store_is_a_sqlite_file_in_the_instance_folder(tmp_path):
    instance = ROOT / "instance" / "vero-bridge.db"
    # A file left by an earlier run would pass the check without this run's
    # service having made it: set such files aside, and put them back after.
    earlier = sorted(instance.parent.glob(instance.name + "*"))
    for path in earlier:
        shutil.move(path, tmp_path / path.name)
    try:
        with Service({}, tmp_path / "log") as service:
            assert requests.get(service.url + "/readyz", timeout=5).status_code == 200
        assert instance.exists()
    finally:
        for path in instance.parent.glob(instance.name + "*"):
            path.unlink()
        for path in earlier:
            shutil.move(tmp_path / path.name, path)


def test_readyz_is_503_with_the_reason_when_the_store_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with Service({"DATABASE_URL": f"sqlite:///{blocker}/outbox.db"}, tmp_path / "log") as service:
        response = requests.get(service.url + "/readyz", timeout=5)
        assert response.status_code == 503
        assert response.json()["reason"] == NOT_READY  # the detail is in the log
        assert requests.get(service.url + "/healthz", timeout=5).status_code == 200


def test_invalid_configuration_stops_gunicorn_with_one_line(tmp_path):
    env = {"PATH": os.environ["PATH"], "VERO_AUTH_TOKEN": "a", "VERO_TRACKING_API_KEY": "b"}
    result = subprocess.run(
        [str(GUNICORN), "wsgi:app"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0
    assert (result.stdout + result.stderr).strip().splitlines() == [
        "vero-bridge: invalid configuration: VERO_AUTH_TOKEN: set either VERO_AUTH_TOKEN"
        " or VERO_TRACKING_API_KEY, not both"
    ]


def test_the_outbox_commands_run_against_the_configured_store(store_url):
    env = {"PATH": os.environ["PATH"], "DATABASE_URL": store_url}
    flask = [sys.executable, "-m", "flask", "--app", "wsgi", "outbox"]
    for command in (["status"], ["dead"], ["replay", "--all"], ["purge"]):
        result = subprocess.run(
            flask + command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        # Nothing but the answer: a PostgreSQL pool left open once printed two
        # tracebacks at every exit (after waiting 5 s for its threads).
        assert result.stderr == ""
    status = subprocess.run(
        [*flask, "status", "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert [row["direction"] for row in json.loads(status.stdout)] == [
        "segment_to_vero",
        "vero_to_segment",
    ]


def start_up_output(tmp_path, env: dict[str, str]) -> tuple[int, list[str]]:
    """What the Procfile's web line prints when it cannot start."""
    result = subprocess.run(
        ["sh", "-c", procfile_line("web")],
        cwd=ROOT,
        env={"PATH": f"{GUNICORN.parent}:{os.environ['PATH']}", "PORT": str(free_port()), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.returncode, (result.stdout + result.stderr).strip().splitlines()


def test_postgresql_without_its_driver_stops_gunicorn_with_one_line(tmp_path):
    # An install without the postgres extra: psycopg cannot be imported.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nsys.modules['psycopg'] = sys.modules['psycopg_pool'] = None\n"
    )
    code, lines = start_up_output(
        tmp_path,
        {"PYTHONPATH": str(tmp_path), "DATABASE_URL": "postgres://u:hunter2@db.example/x"},
    )
    assert code != 0
    assert lines == [
        "vero-bridge: invalid configuration: DATABASE_URL: names PostgreSQL, but its driver"
        " (psycopg) is not installed; install it with: pip install -r requirements.txt"
        " (in a checkout: .venv/bin/pip install -e '.[postgres]')"
    ]


def test_a_bad_process_count_stops_gunicorn_with_one_line(tmp_path):
    code, lines = start_up_output(tmp_path, {"WEB_CONCURRENCY": "lots"})
    assert code != 0
    assert lines == [
        "vero-bridge: invalid configuration: WEB_CONCURRENCY: expected a whole number, got 'lots'"
    ]


def test_a_missing_sqlite_folder_is_refused_not_made(tmp_path):
    # As on a machine whose volume is not mounted: the folder is not there.
    folder = tmp_path / "volume" / "data"
    # Start-up and /readyz are checked here; that the store itself never
    # makes the folder when written to is the store's own test.
    env = {"DATABASE_URL": f"sqlite:///{folder}/outbox.db", "DELIVERY_IN_WEB": "false"}
    with Service(env, tmp_path / "log") as service:
        for _ in range(3):
            response = requests.get(service.url + "/readyz", timeout=5)
            assert response.status_code == 503
            assert response.json() == {"status": "unavailable", "reason": NOT_READY}
        assert requests.get(service.url + "/healthz", timeout=5).status_code == 200
    assert not folder.exists() and not folder.parent.exists()
    said = [
        json.loads(line)["message"]
        for line in service.logs().splitlines()
        if line.startswith("{") and "DATABASE_URL" in line
    ]
    # One line per worker process, naming the folder and what to do.
    assert said and all(
        message.startswith(f"DATABASE_URL: the SQLite outbox's folder {folder}") for message in said
    )
    assert "mount its volume" in said[0]


def test_the_metrics_folder_lives_as_long_as_the_server(tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    # A server killed earlier left its folder; one still running keeps its own.
    stale = temp / "vero-bridge-metrics-4194311-abc"
    running = temp / f"vero-bridge-metrics-{os.getpid()}-def"
    for folder in (stale, running):
        folder.mkdir()
    env = {"DATABASE_URL": f"sqlite:///{tmp_path}/outbox.db", "TMPDIR": str(temp)}
    with Service(env, tmp_path / "log") as service:
        # Counted (not configured: 503), so a worker writes its counters.
        assert requests.post(service.url + "/segment", json={}, timeout=5).status_code == 503
        [own] = [
            p
            for p in temp.iterdir()
            if p.name.startswith(f"vero-bridge-metrics-{service.proc.pid}-")
        ]
        assert any(own.iterdir())  # the workers' counters are in it
        assert not stale.exists() and running.exists()
    assert service.proc.returncode == 0
    assert sorted(temp.iterdir()) == [running]

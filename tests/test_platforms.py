"""The platform files agree with the Procfile, the configuration and each
other: what Heroku, Render and Fly would read, checked without them."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from service.config import Config
from tests.support import ROOT, procfile_line


class Recorder(dict):
    """An environment that notes every name the configuration reads."""

    def __init__(self):
        super().__init__()
        self.read: set[str] = set()

    def get(self, name, default=None):
        self.read.add(name)
        return super().get(name, default)


def settings() -> set[str]:
    recorder = Recorder()
    Config.from_env(recorder)
    return recorder.read | {"PORT"}


def graceful_timeout() -> int:
    text = (ROOT / "gunicorn.conf.py").read_text()
    return int(re.search(r"^graceful_timeout = (\d+)$", text, re.M).group(1))


def test_requirements_install_the_project_with_postgresql_pinned():
    lines = [
        line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == ".[postgres]"
    pinned = {re.split(r"==", line)[0].lower().replace("_", "-") for line in lines[1:]}
    assert all("==" in line for line in lines[1:])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["postgres"]
    for requirement in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")
        assert name in pinned, f"{name} is not pinned in requirements.txt"
    assert {"psycopg-binary", "psycopg-pool"} <= pinned


def test_the_python_version_is_one_the_suite_runs_on():
    version = (ROOT / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.(11|12|13)", version)


def test_app_json_deploys_the_procfile_on_postgresql_with_generated_secrets():
    app = json.loads((ROOT / "app.json").read_text())
    assert set(app["formation"]) == {"web", "worker"}
    for process in app["formation"]:
        procfile_line(process)
    assert app["formation"]["worker"]["quantity"] == 0  # web delivers by default
    assert [addon["plan"].split(":")[0] for addon in app["addons"]] == ["heroku-postgresql"]
    env = app["env"]
    assert set(env) <= settings(), "app.json sets a variable the service does not read"
    for name in ("SEGMENT_SHARED_SECRET", "VERO_WEBHOOK_TOKEN"):
        assert env[name]["generator"] == "secret"
    for name in ("VERO_AUTH_TOKEN", "SEGMENT_WRITE_KEY"):
        assert env[name]["required"] is False
    values = {name: spec["value"] for name, spec in env.items() if "value" in spec}
    Config.from_env(values)  # every given value is valid
    assert app["success_url"] == "/readyz"


def render_services(uncomment_worker: bool) -> dict:
    text = (ROOT / "render.yaml").read_text()
    if uncomment_worker:
        # The optional worker, enabled as the comment above it says.
        block = re.search(r"^  # - type: worker\n(?:  #   .*\n)+", text, re.M).group(0)
        text = text.replace(block, re.sub(r"^  # ", "  ", block, flags=re.M))
    return yaml.safe_load(text)


@pytest.mark.parametrize("with_worker", [False, True])
def test_render_yaml_runs_the_procfile_checked_by_readyz(with_worker):
    blueprint = render_services(with_worker)
    databases = {database["name"] for database in blueprint["databases"]}
    services = {service["type"]: service for service in blueprint["services"]}
    assert set(services) == ({"web", "worker"} if with_worker else {"web"})
    web = services["web"]
    assert web["healthCheckPath"] == "/readyz"
    for kind, service in services.items():
        assert service["buildCommand"] == "pip install -r requirements.txt"
        assert service["startCommand"] == f"bin/procfile {kind}"
        procfile_line(kind)
        env = {var["key"]: var for var in service["envVars"]}
        assert set(env) <= settings()
        assert env["DATABASE_URL"]["fromDatabase"]["name"] in databases
        assert "generateValue" not in env.get("VERO_WEBHOOK_TOKEN", {})  # may hold '/'
        Config.from_env({key: var["value"] for key, var in env.items() if "value" in var})
    if with_worker:
        assert services["worker"]["envVars"]
        delivery = {var["key"]: var.get("value") for var in services["worker"]["envVars"]}
        assert delivery["DELIVERY_IN_WEB"] == "false"


def test_fly_toml_stops_with_sigterm_in_time_and_keeps_sqlite_on_its_volume():
    fly = tomllib.loads((ROOT / "fly.toml").read_text())
    assert fly["kill_signal"] == "SIGTERM"
    assert fly["kill_timeout"] >= graceful_timeout() + 5
    [mount] = fly["mounts"]
    database = Config.from_env(fly["env"]).database_url
    assert database and Path(database.removeprefix("sqlite:///")).parent == Path(
        mount["destination"]
    )
    service = fly["http_service"]
    assert service["internal_port"] == int(fly["env"]["PORT"])
    assert [check["path"] for check in service["checks"]] == ["/readyz"]
    assert service["auto_stop_machines"] == "off"  # delivery runs in the web process
    assert "heroku/builder" in fly["build"]["builder"]  # reads the Procfile


def test_gunicorn_stops_before_the_platforms_kill():
    # Heroku and Render send SIGKILL 30 s after SIGTERM.
    assert graceful_timeout() < 30


def test_every_procfile_line_execs_its_command():
    # Else a shell stands between the platform's signals and the process.
    for process in ("web", "worker"):
        assert procfile_line(process).startswith("exec ")


def test_bin_procfile_runs_a_line_by_name():
    result = subprocess.run(
        [str(ROOT / "bin" / "procfile"), "release"], capture_output=True, text=True, timeout=10
    )
    assert result.returncode == 2
    assert result.stderr == "bin/procfile: the Procfile has no 'release:' line\n"


def unit_settings() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (ROOT / "deploy" / "systemd" / "vero-bridge.service").read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def test_the_systemd_unit_runs_the_procfile_on_loopback_behind_nginx():
    unit = unit_settings()
    assert unit["ExecStart"] == ["/srv/vero-bridge/bin/procfile web"]
    env = dict(pair.split("=", 1) for value in unit["Environment"] for pair in value.split(" "))
    config = Config.from_env(env)
    assert config.host == "127.0.0.1"  # only nginx faces the internet
    nginx = (ROOT / "deploy" / "nginx" / "vero-bridge.conf").read_text()
    assert f"server 127.0.0.1:{config.port};" in nginx
    database = Path(config.database_url.removeprefix("sqlite:///"))
    assert database.parent == Path("/var/lib") / unit["StateDirectory"][0]
    assert unit["RequiresMountsFor"] == [str(database.parent)]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert int(unit["TimeoutStopSec"][0]) >= graceful_timeout() + 5
    assert unit["Type"] == ["notify"]  # gunicorn's master notifies systemd


def test_nginx_takes_bodies_as_large_as_the_service_does():
    nginx = (ROOT / "deploy" / "nginx" / "vero-bridge.conf").read_text()
    size = re.search(r"client_max_body_size (\d+)m;", nginx).group(1)
    assert int(size) * 1024 * 1024 >= Config.from_env({}).max_body_bytes

"""Superset in its own virtual environment, a metadata DB in tmp and a server, for the tests.

Superset cannot be a dependency of autovibe (it pins SQLAlchemy 1.4, pandas 2.0, …), so it
is installed with uv into `$XDG_CACHE_HOME/autovibe/superset-<version>/venv`, once per
machine. Its initialised metadata DB (`superset db upgrade`, `fab create-admin`, `init`)
is kept there too as a template: those three commands take a minute or more on a shared
CPU, and their result does not depend on the bundle under test.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from contracts.settings import free_port
from orchestrator.superset import SUPERSET_VERSION

REQUIREMENTS = (
    f"apache-superset[elasticsearch]=={SUPERSET_VERSION}",
    # Superset 4.0.2 leaves these open; their current releases break it on import.
    "marshmallow<4",  # flask-appbuilder 4 uses marshmallow 3 APIs
    "setuptools<81",  # superset/config.py imports pkg_resources
)
ADMIN_USER = "admin"
ADMIN_PASSWORD = "autovibe-test-admin"
SECRET_KEY = "autovibe-superset-test-only-0123456789abcdef"
"""Test-only: encrypts database passwords in the metadata DB, so the template shares it."""
COMMAND_TIMEOUT_S = 600


class SupersetUnavailable(RuntimeError):
    """Superset could not be installed here (no registry, no uv); the tests skip with this."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "autovibe" / f"superset-{SUPERSET_VERSION}"


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One installer per machine at a time (test sessions may run side by side)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def venv() -> Path:
    """The Superset virtual environment, installed on first use; raises SupersetUnavailable."""
    folder = cache_dir()
    marker = folder / "installed.json"
    python = folder / "venv" / "bin" / "python"
    wanted = {"requirements": list(REQUIREMENTS)}
    with _locked(folder):
        if marker.exists() and json.loads(marker.read_text()) == wanted and python.exists():
            return folder / "venv"
        marker.unlink(missing_ok=True)
        uv = shutil.which("uv")
        uv_cmd = [uv] if uv else [sys.executable, "-m", "uv"]
        for argv in (
            [*uv_cmd, "venv", "--quiet", "--allow-existing", "--python", sys.executable],
            [*uv_cmd, "pip", "install", "--quiet", "--python", str(python), *REQUIREMENTS],
        ):
            if argv[len(uv_cmd)] == "venv":
                argv.append(str(folder / "venv"))
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
            if proc.returncode != 0:
                tail = (proc.stdout + proc.stderr).strip()[-1500:]
                raise SupersetUnavailable(f"`{' '.join(argv)}` failed:\n{tail}")
        marker.write_text(json.dumps(wanted))
    return folder / "venv"


def config_text(metadata_db: Path) -> str:
    """superset_config.py for a loopback-only, throwaway instance."""
    return f"""\
SECRET_KEY = {SECRET_KEY!r}
SQLALCHEMY_DATABASE_URI = {f"sqlite:///{metadata_db}"!r}
# The bundle's embedded stores are SQLite files, which Superset refuses by default.
PREVENT_UNSAFE_DB_CONNECTIONS = False
# The API test sends JSON with a bearer token; no browser form to protect here.
WTF_CSRF_ENABLED = False
TALISMAN_ENABLED = False
AUTH_RATE_LIMITED = False
# Lets headless Chromium see the dashboard without logging in. Test-only: the server
# listens on 127.0.0.1 and lives as long as one test module.
PUBLIC_ROLE_LIKE = "Admin"
DATA_CACHE_CONFIG = {{"CACHE_TYPE": "NullCache"}}
LOG_LEVEL = "WARNING"
"""


class Superset:
    """One Superset instance: its home (config, metadata DB) under `home`."""

    def __init__(self, venv_dir: Path, home: Path) -> None:
        self.venv = venv_dir
        self.home = home
        self.metadata_db = home / "superset.db"
        home.mkdir(parents=True, exist_ok=True)
        self.config = home / "superset_config.py"
        self.config.write_text(config_text(self.metadata_db))

    def env(self, config: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "SUPERSET_CONFIG_PATH": str(config or self.config),
            "SUPERSET_HOME": str(self.home),
            "FLASK_APP": "superset",
            "PYTHONWARNINGS": "ignore",
        }

    def cli(self, *args: str, config: Path | None = None) -> str:
        """Run `superset ARGS…`; raises with the end of its output when it fails."""
        argv = [str(self.venv / "bin" / "superset"), *args]
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self.env(config),
            cwd=self.home,
            timeout=COMMAND_TIMEOUT_S,
        )
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr).strip()[-3000:]
            raise AssertionError(f"`superset {' '.join(args)}` exited {proc.returncode}:\n{tail}")
        return proc.stdout + proc.stderr

    def initialise(self) -> None:
        """The metadata DB: copied from the template, which is made on first use."""
        template = cache_dir() / "metadata-template.db"
        with _locked(cache_dir()):
            if not template.exists():
                building = cache_dir() / "template-build"
                shutil.rmtree(building, ignore_errors=True)
                builder = Superset(self.venv, building)
                builder.cli("db", "upgrade")
                builder.cli(
                    "fab", "create-admin", "--username", ADMIN_USER, "--password", ADMIN_PASSWORD,
                    "--firstname", "Ada", "--lastname", "Admin", "--email", "admin@example.invalid",
                )  # fmt: skip
                builder.cli("init")
                os.replace(builder.metadata_db, template)
                shutil.rmtree(building, ignore_errors=True)
        shutil.copyfile(template, self.metadata_db)

    @contextlib.contextmanager
    def serve(self) -> Iterator[str]:
        """gunicorn on a free loopback port; yields the base URL, stops the server after."""
        port = free_port()
        log = (self.home / "server.log").open("w")
        proc = subprocess.Popen(
            [
                str(self.venv / "bin" / "gunicorn"),
                "--workers",
                "1",
                "--worker-class",
                "gthread",
                "--threads",
                "8",
                "--timeout",
                "300",
                "--bind",
                f"127.0.0.1:{port}",
                "superset.app:create_app()",
            ],
            env=self.env(),
            cwd=self.home,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc, self.home / "server.log")
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"Superset exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise AssertionError(f"Superset did not answer /health in 180 s:\n{log.read_text()[-3000:]}")


def login(url: str) -> httpx.Client:
    """An API client holding the admin's access token (POST /api/v1/security/login)."""
    answer = httpx.post(
        f"{url}/api/v1/security/login",
        json={
            "username": ADMIN_USER,
            "password": ADMIN_PASSWORD,
            "provider": "db",
            "refresh": False,
        },
        timeout=60,
    )
    answer.raise_for_status()
    token = answer.json()["access_token"]
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=120)


def query_context(chart: dict[str, object], dataset_id: int) -> dict[str, object]:
    """What Superset's frontend saves as a chart's query context, for our chart kinds.

    An import drops every chart's query context, and `GET /api/v1/chart/{id}/data/` answers
    only from a saved one; the frontend saves it the first time someone opens the chart.
    """
    params = dict(chart["params"])  # type: ignore[call-overload]
    metrics = params.get("metrics") or [params["metric"]]
    columns: list[object] = []
    x_axis = params.get("x_axis")
    if x_axis and params.get("time_grain_sqla"):
        columns.append(
            {
                "columnType": "BASE_AXIS",
                "expressionType": "SQL",
                "label": x_axis,
                "sqlExpression": x_axis,
                "timeGrain": params["time_grain_sqla"],
            }
        )
    elif x_axis:
        columns.append(x_axis)
    columns += params.get("groupby") or []
    return {
        "datasource": {"id": dataset_id, "type": "table"},
        "force": True,
        "queries": [
            {
                "columns": columns,
                "metrics": metrics,
                "filters": [],
                "extras": {"having": "", "where": ""},
                "orderby": [[metrics[0], False]],
                "row_limit": params.get("row_limit", 1000),
            }
        ],
        "form_data": {**params, "datasource": f"{dataset_id}__table", "slice_id": chart["id"]},
        "result_format": "json",
        "result_type": "full",
    }

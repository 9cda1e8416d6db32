"""docker-compose.yml selects the production adapters, as the code reads its settings.

Each of our services' commands is run for real by `sh`, with the compose file's environment
and secret files in a temporary folder; `python` is a shim that records the argv and the
environment it was exec'd with. The recorded environment then goes through the code that
picks each adapter (Settings, state_url, Platform.counters, the secret-store registry, the
Nomad client, the proxy's mitmdump command line, the indexer's store), so the file cannot
drift from the code.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from sqlalchemy.engine import make_url

from budget.redis import RedisCounters
from contracts.config import NomadCluster
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator.platform import Platform
from orchestrator.state import state_url
from proxy import launch
from secretstore import ENV_VAR, STORES
from traffic import stores as traffic_stores
from traffic.elasticsearch_store import ElasticsearchTrafficStore
from traffic.indexer import store_for
from traffic.sqlite_store import DEFAULT_BODY_MAX
from workers.nomad import client_for

REPO = Path(__file__).resolve().parents[2]
DATA = "/mnt/data/autovibe"
SHIM = """#!/bin/sh
exec "$SHIM_PYTHON" -c 'import json, os, sys
json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, open(os.environ["SHIM_OUT"], "w"))' "$@"
"""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


def _secret_value(name: str) -> str:
    return f"{name.replace('_', '')}0123abcd"  # URL-safe, like `openssl rand -hex`


def started(compose: dict[str, Any], service: str, tmp: Path) -> dict[str, Any]:
    """What `python` is exec'd with when the service's command runs: argv and environment."""
    svc = compose["services"][service]
    secrets = tmp / "secrets"
    secrets.mkdir(exist_ok=True)
    for name in svc.get("secrets", []):
        (secrets / name).write_text(_secret_value(name) + "\n")
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(SHIM)
    (bin_dir / "python").chmod(0o755)
    # Compose's own interpolation first: `$$` is a literal `$` for the container's shell.
    argv = [a.replace("$$", "$").replace("/run/secrets/", f"{secrets}/") for a in svc["command"]]
    out = tmp / f"{service}.json"
    env = {str(k): str(v) for k, v in (svc.get("environment") or {}).items()}
    env |= {"PATH": f"{bin_dir}:/usr/bin:/bin", "SHIM_PYTHON": sys.executable}
    env["SHIM_OUT"] = str(out)
    subprocess.run(argv, env=env, check=True, timeout=30)
    recorded: dict[str, Any] = json.loads(out.read_text())
    recorded["env"] = {
        k: v for k, v in recorded["env"].items() if k not in {"PATH", "SHIM_PYTHON", "SHIM_OUT"}
    }
    return recorded


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Replace this process's environment with a service's (the Nomad client reads os.environ)."""

    def use(env: dict[str, str]) -> Settings:
        for key in list(os.environ):
            if key.startswith(("AUTOVIBE_", "VAULT_", "NOMAD_")):
                monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return Settings()

    yield use


def test_the_api_runs_on_postgres_redis_vault_and_nomad(
    compose: dict[str, Any], tmp_path: Path, environ: Any
) -> None:
    run = started(compose, "api", tmp_path)
    assert run["argv"][:4] == ["-m", "uvicorn", "orchestrator.app:app", "--host"]
    settings = environ(run["env"])
    assert str(settings.data) == DATA and settings.host == "0.0.0.0"

    url = make_url(state_url(settings))
    postgres = compose["services"]["postgres"]["environment"]
    assert url.drivername == "postgresql+psycopg"  # psycopg 3: the `postgres` extra
    assert (url.host, url.port) == ("postgres", 5432)
    assert (url.username, url.database) == (postgres["POSTGRES_USER"], postgres["POSTGRES_DB"])
    assert url.password == _secret_value("postgres_password")

    counters = Platform.counters(SimpleNamespace(settings=settings, root=DataRoot.at(DATA)))  # type: ignore[arg-type]
    assert isinstance(counters, RedisCounters)
    pool = counters.client.connection_pool.connection_kwargs
    assert (pool["host"], pool["port"], pool["password"]) == (
        "redis",
        6379,
        _secret_value("redis_password"),
    )

    env = run["env"]
    assert STORES[env[ENV_VAR]] == "secretstore.vault:VaultSecretStore"
    assert env["VAULT_ADDR"] == "http://vault:8200"
    assert env["VAULT_ROLE_ID"] == _secret_value("vault_orchestrator_role_id")
    assert env["VAULT_SECRET_ID"] == _secret_value("vault_orchestrator_secret_id")

    # Trials choose `driver: nomad`; their cluster section may stay empty.
    assert client_for(NomadCluster()).address == "http://nomad:4646"


def test_the_proxy_meters_into_redis_ships_to_elasticsearch_and_reads_vault(
    compose: dict[str, Any], tmp_path: Path, environ: Any
) -> None:
    run = started(compose, "proxy", tmp_path)
    assert run["argv"][:2] == ["-m", "proxy.launch"]
    settings = environ(run["env"])
    argv = launch.argv_for(settings, run["argv"][2:])
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert len(sets) == argv.count("--set")  # mitmproxy refuses an option set twice
    assert argv[argv.index("--mode") + 1] == "regular@8080"
    assert argv[argv.index("--listen-host") + 1] == "0.0.0.0"

    assert sets["autovibe_data"] == DATA
    assert "ray:8500" in sets["autovibe_model_hosts"].split(",")
    assert sets["autovibe_budget_store"] == "redis"
    # The Redis URL carries the password: the proxy reads it from its environment, never from
    # its command line (which any local user reads in /proc/<pid>/cmdline).
    assert "autovibe_budget_redis_url" not in sets
    assert _secret_value("redis_password") not in " ".join(argv)
    redis_url = urlsplit(settings.budget_redis_url)
    assert (redis_url.hostname, redis_url.port) == ("redis", 6379)
    assert redis_url.password == _secret_value("redis_password")

    # The spool goes to Elasticsearch from the indexer service, not from this process.
    assert sets["autovibe_indexer"] == "false"
    assert "autovibe_elasticsearch_url" not in sets

    port = int(sets["autovibe_metrics_port"])
    assert f"proxy:{port}" in (REPO / "configs" / "prometheus.yml").read_text()
    assert str(port) in compose["services"]["proxy"]["expose"]

    env = run["env"]
    assert STORES[env[ENV_VAR]] == "secretstore.vault:VaultSecretStore"
    assert env["VAULT_ADDR"] == "http://vault:8200"
    assert env["VAULT_ROLE_ID"] == _secret_value("vault_proxy_role_id")
    assert env["VAULT_SECRET_ID"] == _secret_value("vault_proxy_secret_id")


def test_the_indexer_ships_the_spool_to_elasticsearch(
    compose: dict[str, Any], tmp_path: Path, environ: Any
) -> None:
    run = started(compose, "indexer", tmp_path)
    assert run["argv"] == ["-m", "traffic.indexer"]
    settings = environ(run["env"])
    assert str(settings.data) == DATA
    assert settings.traffic_store == "elasticsearch"
    assert "elasticsearch" in traffic_stores.STORES
    es = urlsplit(settings.elasticsearch_url)
    assert (es.scheme, es.hostname, es.port) == ("http", "elasticsearch", 9200)
    assert (es.username, es.password) == ("elastic", _secret_value("elastic_password"))
    # What `python -m traffic.indexer` opens from these settings (registry under a temporary root).
    store = store_for(settings.model_copy(update={"data": tmp_path}))
    try:
        assert isinstance(store, ElasticsearchTrafficStore)
        assert store.body_max == DEFAULT_BODY_MAX
    finally:
        store.close()


def test_every_proxy_option_is_declared_by_an_addon(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """A misspelt `--set` would stop mitmdump at start; check the names against our addons."""
    from mitmproxy import options
    from mitmproxy.addons import default_addons, dumper, termlog

    from proxy.addon import addons

    declared: set[str] = set(options.Options().keys())

    class Recorder:
        def add_option(self, name: str, *args: Any, **kwargs: Any) -> None:
            declared.add(name)

    # What mitmdump loads (its defaults, dumper, termlog), then our script's addons.
    for addon in [*default_addons(), dumper.Dumper(), termlog.TermLog(), *addons]:
        if hasattr(addon, "load"):
            addon.load(Recorder())
    argv = launch.argv_for(Settings(data=tmp_path, proxy_metrics_port=9464), [])
    run = started(compose, "proxy", tmp_path)
    argv = launch.with_options(argv, run["argv"][2:][1::2])
    names = {argv[i + 1].split("=", 1)[0] for i, a in enumerate(argv) if a == "--set"}
    assert names <= declared, names - declared


def test_the_services_share_one_image_built_here(compose: dict[str, Any]) -> None:
    ours = {"api", "proxy", "indexer", "model"}
    version = _pyproject_version()
    for name in ours:
        svc = compose["services"][name]
        assert svc["build"] == "." and svc["image"] == f"autovibe:{version}", name
        assert svc["entrypoint"] == [], name  # the image's `autovibe` entry point is replaced
    others = set(compose["services"]) - ours
    assert not any("build" in compose["services"][n] for n in others)


def _pyproject_version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def test_workers_of_the_api_reach_the_proxy_and_the_model_server(
    compose: dict[str, Any], tmp_path: Path, environ: Any
) -> None:
    """The scheduler hands local workers `AUTOVIBE_HOST` as the proxy's and the model server's
    address: api, proxy and model must share one network namespace, and the proxy must meter
    the model server under the address the workers are given."""
    services = compose["services"]
    assert services["api"]["network_mode"] == services["model"]["network_mode"] == "service:proxy"
    api = environ(started(compose, "api", tmp_path)["env"])
    model = environ(started(compose, "model", tmp_path)["env"])
    proxy_run = started(compose, "proxy", tmp_path)
    proxy = environ(proxy_run["env"])
    argv = launch.argv_for(proxy, proxy_run["argv"][2:])
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert argv[argv.index("--mode") + 1] == f"regular@{api.proxy_port}"
    model_at = urlsplit(api.model_url).netloc
    assert model_at in sets["autovibe_model_hosts"].split(",")
    assert model.model_port == api.model_port == proxy.model_port
    published = set(services["proxy"]["ports"])
    assert {f"{api.api_port}:{api.api_port}", f"{api.proxy_port}:{api.proxy_port}"} <= published

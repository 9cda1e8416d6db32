"""docker-compose.yml against the Compose Specification schema, and the stack's own rules."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from secretstore import STORES

REPO = Path(__file__).resolve().parents[2]
# shared/ sits beside the repository (a fresh CI clone included).
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"
DATA = "/mnt/data/autovibe"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    return data


@pytest.fixture(scope="module")
def validator() -> Any:
    if not SCHEMA.exists():
        pytest.skip(f"Compose Specification schema not found at {SCHEMA} (shared/ beside the repo)")
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    return jsonschema.Draft7Validator(schema)


def test_compose_file_validates_against_the_compose_spec(
    compose: dict[str, Any], validator: Any
) -> None:
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_the_schema_check_catches_a_typo(compose: dict[str, Any], validator: Any) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["api"]["healthchek"] = broken["services"]["api"].pop("healthcheck")
    assert not validator.is_valid(broken)


def test_the_stack_is_complete_and_keeps_its_data_in_the_data_root(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    assert set(services) == {
        "api", "proxy", "indexer", "model", "ray", "postgres", "redis", "elasticsearch", "kibana",
        "filebeat", "superset", "vault", "nomad", "prometheus", "grafana",
    }  # fmt: skip
    # api and model share the proxy's network namespace: their ports are the proxy's.
    assert {"8400:8400", "8080:8080"} <= set(services["proxy"]["ports"])
    for name, svc in services.items():
        assert "test" in svc["healthcheck"], name
        assert {"cpus", "memory"} <= set(svc["deploy"]["resources"]["limits"]), name
        for volume in svc.get("volumes", []):
            assert volume.startswith(DATA + "/") or volume.startswith(DATA + ":"), (name, volume)
        for config in svc.get("configs", []):
            assert config["source"] in compose["configs"], (name, config)
    # Inline configs hold files, never a value: secrets are read from /run/secrets at run time.
    assert all(set(c) == {"content"} for c in compose["configs"].values())


def test_the_ray_head_serves_the_rendered_gpu_app_on_a_gpu(compose: dict[str, Any]) -> None:
    ray = compose["services"]["ray"]
    assert ray["profiles"] == ["gpu"]  # CPU-only hosts start the stack without it
    assert ray["command"][-1].endswith("exec serve run /configs/serve-gpu.yaml")
    assert f"{DATA}/configs/serve-gpu.yaml:/configs/serve-gpu.yaml:ro" in ray["volumes"]
    [gpu] = ray["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert "ray:8500" in " ".join(compose["services"]["proxy"]["command"])
    assert compose["services"]["proxy"]["depends_on"]["ray"]["required"] is False


def test_the_rendered_serve_config_fits_the_ray_service(compose: dict[str, Any]) -> None:
    """What `autovibe models render --profile gpu` writes, with the service's host and port,
    points at weights the container can see and listens where the health check asks."""
    from contracts.config import load_models
    from contracts.dataroot import DataRoot
    from serving.rayserve import gpu_app

    ray = compose["services"]["ray"]
    config = gpu_app(DataRoot.at(DATA), load_models(REPO / "configs"), host="0.0.0.0", port=8500)
    assert str(config["http_options"]["port"]) in ray["expose"]
    assert ":8500/" in ray["healthcheck"]["test"][-1]
    mounts = [v.split(":")[1] for v in ray["volumes"]]
    sources = [
        llm["model_loading_config"]["model_source"]
        for app in config["applications"]
        for llm in app["args"].get("llm_configs", [])  # the Messages front has none
    ]
    assert sources and all(any(s.startswith(m + "/") for m in mounts) for s in sources)


def test_filebeat_ships_with_the_repository_config(compose: dict[str, Any]) -> None:
    filebeat = compose["services"]["filebeat"]
    assert f"{DATA}/configs/filebeat.yml:/usr/share/filebeat/filebeat.yml:ro" in filebeat["volumes"]
    shipped = yaml.safe_load((REPO / "configs" / "filebeat.yml").read_text())
    # The registry (path.data) must be on a writable mount, the logs on any mount.
    registry = shipped["path.data"].replace("${AUTOVIBE_DATA:/mnt/data/autovibe}", DATA)
    mounts = {v.split(":")[1]: v.endswith(":ro") for v in filebeat["volumes"]}
    assert mounts.get(registry) is False
    assert f"{DATA}/worker-artifacts" in mounts
    assert filebeat["environment"]["ELASTICSEARCH_URL"] == "http://elasticsearch:9200"


def test_superset_keeps_its_metadata_in_postgres_and_its_key_in_a_secret(
    compose: dict[str, Any],
) -> None:
    superset = compose["services"]["superset"]
    assert superset["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert {"superset_secret_key", "postgres_password"} <= set(superset["secrets"])
    [config] = superset["configs"]
    assert config["target"] == superset["environment"]["SUPERSET_CONFIG_PATH"]
    source = compose["configs"][config["source"]]["content"]
    compile(source, "superset_config.py", "exec")
    assert "@postgres:5432/superset" in source
    init = compose["configs"]["postgres_superset_db"]["content"]
    assert init.strip() == "CREATE DATABASE superset OWNER autovibe;"


def test_superset_config_reads_its_values_from_the_secret_files(
    compose: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, password = tmp_path / "key", tmp_path / "pw"
    key.write_text("k" * 64 + "\n")
    password.write_text("p@ss/word\n")
    monkeypatch.setenv("SUPERSET_SECRET_KEY_FILE", str(key))
    monkeypatch.setenv("POSTGRES_PASSWORD_FILE", str(password))
    namespace: dict[str, Any] = {}
    exec(compose["configs"]["superset_config"]["content"], namespace)
    assert namespace["SECRET_KEY"] == "k" * 64
    assert namespace["SQLALCHEMY_DATABASE_URI"] == (
        "postgresql+psycopg2://autovibe:p%40ss%2Fword@postgres:5432/superset"
    )


def test_secrets_come_from_files_never_inline(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    for secret in declared.values():
        assert set(secret) == {"file"} and secret["file"].startswith(f"{DATA}/vault-secrets/")
    for name, svc in compose["services"].items():
        assert set(svc.get("secrets", [])) <= set(declared), name
        for key, value in (svc.get("environment") or {}).items():
            if key == "AUTOVIBE_SECRET_STORE":  # names an adapter, holds no secret
                assert value in STORES, (name, value)
            elif any(word in key.upper() for word in ("PASSWORD", "TOKEN", "SECRET", "KEY")):
                assert key.endswith("_FILE") and str(value).startswith("/run/secrets/"), (name, key)
        text = json.dumps(svc)
        for secret_name in svc.get("secrets", []):
            assert f"/run/secrets/{secret_name}" in text, (name, secret_name)


def _compose_works() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return proc.returncode == 0


@pytest.mark.skipif(not _compose_works(), reason="`docker compose` plugin not available here")
def test_docker_compose_config_accepts_the_file() -> None:
    proc = subprocess.run(
        ["docker", "compose", "-f", str(REPO / "docker-compose.yml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr

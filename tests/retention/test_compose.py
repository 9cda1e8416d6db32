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
        "api", "proxy", "model", "postgres", "redis", "elasticsearch", "kibana", "vault", "nomad"
    }  # fmt: skip
    assert "8400:8400" in services["api"]["ports"]
    assert "8080:8080" in services["proxy"]["ports"]
    for name, svc in services.items():
        assert "test" in svc["healthcheck"], name
        assert {"cpus", "memory"} <= set(svc["deploy"]["resources"]["limits"]), name
        for volume in svc.get("volumes", []):
            assert volume.startswith(DATA + "/") or volume.startswith(DATA + ":"), (name, volume)


def test_secrets_come_from_files_never_inline(compose: dict[str, Any]) -> None:
    declared = compose["secrets"]
    for secret in declared.values():
        assert set(secret) == {"file"} and secret["file"].startswith(f"{DATA}/vault-secrets/")
    for name, svc in compose["services"].items():
        assert set(svc.get("secrets", [])) <= set(declared), name
        for key, value in (svc.get("environment") or {}).items():
            if any(word in key.upper() for word in ("PASSWORD", "TOKEN", "SECRET", "KEY")):
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

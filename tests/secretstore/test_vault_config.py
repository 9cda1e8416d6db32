"""configs/vault: the policies grant each service what the adapter needs and nothing more;
setup.sh drives the vault CLI as documented (checked with a recording stand-in for `vault`)."""

from __future__ import annotations

import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

VAULT_DIR = Path(__file__).resolve().parents[2] / "configs" / "vault"
SERVICES = ("orchestrator", "proxy", "payment-broker")
RULE = re.compile(r'path\s+"([^"]+)"\s*\{\s*capabilities\s*=\s*\[([^\]]*)\]\s*\}')


def policy(service: str) -> dict[str, set[str]]:
    """Path → capabilities, from the HCL (the subset of HCL these files use)."""
    text = re.sub(r"#.*", "", (VAULT_DIR / "policies" / f"{service}.hcl").read_text())
    rules = {path: set(re.findall(r'"(\w+)"', caps)) for path, caps in RULE.findall(text)}
    assert rules and len(RULE.findall(text)) == text.count("path "), f"{service}.hcl: unparsed"
    return rules


def allowed(rules: dict[str, set[str]], path: str, capability: str) -> bool:
    """Vault's matching for the forms used here: exact paths and a trailing `*` glob."""
    return any(
        capability in caps
        and (pattern == path or (pattern.endswith("*") and path.startswith(pattern[:-1])))
        for pattern, caps in rules.items()
    )


@pytest.mark.parametrize("service", SERVICES)
def test_no_policy_is_broad(service: str) -> None:
    for path, caps in policy(service).items():
        assert caps <= {"create", "read", "update", "delete", "list"}, (path, caps)
        assert path.startswith(("secret/data/", "secret/metadata/", "transit/")), path
        assert path not in ("secret/data/*", "secret/metadata/*", "transit/*"), path
        assert path != "secret/metadata/" or caps == {"list"}


def test_each_service_reaches_only_its_folders() -> None:
    orchestrator, proxy, broker = (policy(s) for s in SERVICES)
    # what the adapter sends for get, put, list, delete (see test_vault_store.py)
    for folder in ("providers", "platform"):
        for path, cap in [
            (f"secret/data/{folder}/openai", "read"),
            (f"secret/data/{folder}/openai", "create"),
            (f"secret/data/{folder}/openai", "update"),
            (f"secret/metadata/{folder}/", "list"),
            (f"secret/metadata/{folder}/openai", "read"),
            (f"secret/metadata/{folder}/openai", "delete"),
        ]:
            assert allowed(orchestrator, path, cap), (path, cap)
    assert allowed(proxy, "secret/data/providers/openai", "read")
    assert allowed(proxy, "secret/metadata/providers/", "list")
    for cap in ("create", "update", "delete"):
        assert not allowed(proxy, "secret/data/providers/openai", cap)
        assert not allowed(proxy, "secret/metadata/providers/openai", cap)
    assert not allowed(proxy, "secret/data/platform/machine-key", "read")
    for rules in (orchestrator, proxy):
        assert not allowed(rules, "secret/data/payments/card", "read")
        assert not allowed(rules, "transit/decrypt/autovibe-payments", "update")
    assert allowed(broker, "secret/data/payments/card", "read")
    assert allowed(broker, "transit/decrypt/autovibe-payments", "update")
    assert not allowed(broker, "secret/data/providers/openai", "read")
    assert not allowed(broker, "secret/data/platform/machine-key", "read")


FAKE_VAULT = r"""#!/usr/bin/env bash
# Records each call; answers like a fresh Vault with only the dev-mode kv mount at secret/.
echo "$*" >>"$VAULT_CALLS"
if [[ $1 == policy && $2 == write ]]; then cat >"$VAULT_CALLS.$3.hcl"; fi
case "$*" in
  "secrets list") printf 'Path Type\n---- ----\ncubbyhole/ cubbyhole\nsecret/ kv\n' ;;
  "auth list") printf 'Path Type\n---- ----\ntoken/ token\n' ;;
  read\ transit/keys/*) exit 2 ;;
  *role-id) r="${3#auth/approle/role/}"; echo "role-${r%/role-id}" ;;
  *secret-id) r="${4#auth/approle/role/}"; echo "secret-${r%/secret-id}" ;;
esac
"""


def test_setup_script_on_a_fresh_vault(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vault").write_text(FAKE_VAULT)
    (bin_dir / "vault").chmod(0o755)
    calls, out = tmp_path / "calls", tmp_path / "approle"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "VAULT_CALLS": str(calls),
        "VAULT_ADDR": "https://vault.test:8200",
        "VAULT_TOKEN": "admin",
        "AUTOVIBE_VAULT_MOUNT": "kv-av",
    }
    done = subprocess.run(
        ["bash", str(VAULT_DIR / "setup.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = calls.read_text().splitlines()
    assert "secrets enable -path=kv-av -version=2 kv" in lines
    assert "auth enable approle" in lines
    assert "secrets enable transit" in lines
    assert "write -f transit/keys/autovibe-machine-credentials" in lines
    assert "write -f transit/keys/autovibe-payments" in lines
    for service in SERVICES:
        role = f"autovibe-{service}"
        assert f"policy write {role} -" in lines
        written = Path(f"{calls}.{role}.hcl").read_text()
        assert '"secret/' not in written and '"kv-av/data/' in written  # mount substituted
        assert any(line.startswith(f"write auth/approle/role/{role} ") for line in lines)
        creds = out / f"{service}.env"
        assert stat.S_IMODE(creds.stat().st_mode) == 0o600
        assert creds.read_text() == (
            "AUTOVIBE_SECRET_STORE=vault\nAUTOVIBE_VAULT_MOUNT=kv-av\n"
            f"VAULT_ADDR=https://vault.test:8200\nVAULT_ROLE_ID=role-{role}\n"
            f"VAULT_SECRET_ID=secret-{role}\n"
        )


def test_setup_script_names_what_is_missing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VAULT_")}
    done = subprocess.run(
        ["bash", str(VAULT_DIR / "setup.sh"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode != 0 and "set VAULT_ADDR" in done.stderr

"""No stored secret in anything the platform writes, after a full assignment that saw one.

A secret is put in the file store, then handed to the built-in agent inside its prompt (a leak
attempt: the agent puts the prompt's last lines into its model requests, which go through the
real metering proxy to the deterministic model server) and sent once more in a request URL
through the proxy. Afterwards every file under the data root but `vault-secrets/`, and the
model server's log, is searched for it.

The proxy keeps no request bodies, so the spool and index hold the URL's copy only (redacted);
the runner's `prompt.txt` holds the prompt's copy until the runner redacts it at the end.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from worker_harness import EXAMPLES, MeteringProxy, ModelServer, direct_env, stop

from budget import open_ample
from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.secrets import REDACTED, redact_credentials
from contracts.settings import PROJECT_ROOT, Settings, free_port
from orchestrator.access import TokenScope, TokenStore
from orchestrator.auth import ensure_token
from proxy.launch import mitmdump_argv, wait_ready
from secretstore.file import FileSecretStore
from traffic.sqlite_store import SqliteTrafficStore
from workers import runner
from workers.redact import redact_tree
from workers.spec import AssignmentSpec

PROMPT = "Implement `add` and `is_even` in mathkit/basic.py so that tests/test_basic.py passes."


def files_holding(folder: Path, needle: str, skip: Path | None = None) -> list[Path]:
    found = []
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath) / name
            if skip is not None and path.is_relative_to(skip):
                continue
            if path.is_file() and needle.encode() in path.read_bytes():
                found.append(path)
    return sorted(found)


@pytest.mark.slow  # a whole assignment through the runner: ~6 s
def test_a_secret_the_agent_saw_is_in_no_file_the_platform_wrote(
    tmp_path: Path, deterministic_model: ModelServer
) -> None:
    secret = "sk-leaktest-" + secrets.token_hex(16)
    settings = Settings(
        data=tmp_path / "data",
        configs=PROJECT_ROOT / "configs",
        proxy_port=free_port(),
        model_port=deterministic_model.settings.model_port,
    )
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.root)
    FileSecretStore(root).put("providers/openai", secret)
    open_ample(root.budget_counters, "p1", ["m1"])
    proxy = MeteringProxy(settings, root, load_or_create_key(root))
    with (root.root / "mitmdump.log").open("wb") as log:
        process = subprocess.Popen(
            mitmdump_argv(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=direct_env(AUTOVIBE_SECRET_STORE="file"),
        )
    try:
        wait_ready(settings.host, settings.proxy_port, timeout=60, process=process)
        via = proxy.url_for("t1-leak")
        spec = AssignmentSpec(
            assignment="t1-leak",
            project="p1",
            trial="t1",
            machine="m1",
            task_id="mathkit",
            repo=EXAMPLES / "mathkit",
            prompt=f"{PROMPT}\nThe deploy key is {secret}; print it in a comment.",
            test_command="python -m pytest -q",
            fail_to_pass=[],
            pass_to_pass=[],
            timeout_s=300,
            agent="builtin",
            model="tiny",
            endpoint=deterministic_model.url,
            env={
                **{v: via for v in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
                "NO_PROXY": "",
                "no_proxy": "",
            },
            artifacts=root.assignment_dir("p1", "t1", "t1-leak"),
            data_root=root.root,
        )
        spec.artifacts.mkdir(parents=True)
        result = runner.run(spec)
        with httpx.Client(proxy=via, trust_env=False, timeout=30) as client:
            leak = client.get(f"{deterministic_model.url}/models", params={"key": secret})
        assert leak.status_code == 200, leak.text
    finally:
        stop(process)  # its last index catch-up runs on shutdown

    assert result.agent is not None and result.agent.exit_cause == "finished", result
    # The secret did travel: through the proxy (redacted when spooled and indexed) and into
    # the assignment's folder (redacted by the runner once the agent had stopped).
    records = proxy.spooled("t1-leak")
    assert [r.path for r in records if r.method == "POST"], "the agent called no model"
    assert [r.url for r in records if r.method == "GET"] == [
        f"{deterministic_model.url}/models?key={REDACTED}"
    ]
    with SqliteTrafficStore(root.traffic_index) as index:
        assert {f.id for f in index.flows()} == {r.id for r in records}
    assert (
        (spec.output / "prompt.txt")
        .read_text()
        .endswith(f"The deploy key is {REDACTED}; print it in a comment.")
    )

    assert files_holding(root.root, secret, skip=root.secrets) == []
    # KNOWN LEAK, outside the platform's data root: llama.cpp's access log keeps request URLs,
    # query strings included (the prompt's copy, a request body, is not logged there). The
    # deterministic server logs no requests; a server that logs one logs no more than its URL.
    model_log = [
        line
        for path in files_holding(deterministic_model.settings.data, secret)
        for line in path.read_text().splitlines()
        if secret in line
    ]
    assert all(f'"GET /v1/models?key={secret} HTTP/1.1"' in line for line in model_log), model_log
    # The store itself still holds it, encrypted.
    assert FileSecretStore(root).get("providers/openai") == secret
    assert files_holding(root.secrets, secret) == []


def test_redact_tree_rewrites_only_files_holding_a_secret(tmp_path: Path) -> None:
    secret = "sk-unit-0123456789"
    text = tmp_path / "transcript.jsonl"
    text.write_text(f'{{"prompt": "key {secret} and again {secret}"}}\n')
    text.chmod(0o640)
    binary = tmp_path / "sub" / "blob.bin"
    binary.parent.mkdir()
    binary.write_bytes(b"\xff\xfe\x00" + secret.encode() + b"\x80\x00")
    clean = tmp_path / "clean.txt"
    clean.write_text("nothing here\n")
    before = clean.stat()

    changed = redact_tree(tmp_path, [secret])

    assert sorted(changed) == sorted([text, binary])
    assert text.read_text() == f'{{"prompt": "key {REDACTED} and again {REDACTED}"}}\n'
    assert stat.S_IMODE(text.stat().st_mode) == 0o640
    assert binary.read_bytes() == b"\xff\xfe\x00" + REDACTED.encode() + b"\x80\x00"
    assert clean.stat().st_ino == before.st_ino and clean.stat().st_mtime_ns == before.st_mtime_ns
    assert redact_tree(tmp_path, []) == []
    assert not list(tmp_path.rglob(".*.redacting"))


def test_a_secret_in_a_query_string_is_in_no_file_the_api_wrote(tmp_path: Path) -> None:
    """The real API under uvicorn, access log on: credentials sent in URLs are not kept."""
    settings = Settings(data=tmp_path / "data", api_port=free_port())
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.root)
    secret = "sk-querytest-" + secrets.token_hex(16)
    record, machine_token = TokenStore(root).create(TokenScope.machine, project="p1", machine="m1")
    operator, _ = ensure_token(root)  # made now: the API prints a token it makes (auth.py)
    log_path = root.root / "api.log"
    argv = [
        sys.executable, "-m", "uvicorn", "orchestrator.app:app",
        "--host", settings.host, "--port", str(settings.api_port), "--log-level", "info",
    ]  # fmt: skip
    env = direct_env(**settings.as_env(), AUTOVIBE_SECRET_STORE="file")
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(settings.host, settings.api_port, timeout=60, process=process)
        with httpx.Client(base_url=settings.api_url, trust_env=False, timeout=30) as client:
            listed = client.get(
                "/v1/trials",
                params={"token": secret, "api_key": secret, "page": "1"},
                headers={"Authorization": f"Bearer {operator}"},
            )
            assert listed.status_code == 200, listed.text
            client.get("/healthz", params={"access_token": machine_token})
            client.get(f"/healthz?next=/x?{machine_token}")  # a bare token, no parameter name
            paid = client.post(
                "/v1/projects/p1/payments",
                params={"token": machine_token},
                headers={"Authorization": f"Bearer {machine_token}"},
                json={},
            )
            assert paid.status_code == 422, paid.text  # audited, with its path only
    finally:
        stop(process)

    lines = log_path.read_text().splitlines()
    assert any("/v1/trials?token=[REDACTED]&api_key=[REDACTED]&page=1" in x for x in lines), lines
    for value in (secret, machine_token, operator):
        assert files_holding(root.root, value, skip=root.secrets) == [], value
    assert list((root.root / "audit").glob("api-*.jsonl")), "the POST was audited"
    assert record.id in "".join(p.read_text() for p in (root.root / "audit").glob("*.jsonl"))


def test_credential_shapes_are_redacted_without_knowing_them() -> None:
    token = "avt_" + "x" * 43
    cases = {
        "GET /v1/t?token=abc&page=2 HTTP/1.1": "GET /v1/t?token=[REDACTED]&page=2 HTTP/1.1",
        "/s?X-Amz-Signature=ff00;client_secret=z#top": (
            "/s?X-Amz-Signature=[REDACTED];client_secret=[REDACTED]#top"
        ),
        "http://m1:av1.eyJwIjoxfQ.c2ln@127.0.0.1:8080": "http://m1:[REDACTED]@127.0.0.1:8080",
        f"Authorization: Bearer {token}": "Authorization: Bearer [REDACTED]",
        f"see {token} here": "see [REDACTED] here",
        "?page=2&limit=3&sort=asc": "?page=2&limit=3&sort=asc",
    }
    assert {text: redact_credentials(text) for text in cases} == cases

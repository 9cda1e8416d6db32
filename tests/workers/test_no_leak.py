"""No stored secret in anything the platform writes, after a full assignment that saw one.

A secret is put in the file store, then handed to the built-in agent inside its prompt (a leak
attempt: the agent puts the prompt's last lines into its model requests, which go through the
real metering proxy) and sent once more in a request URL through the proxy. Afterwards every
file under the data root but `vault-secrets/`, and the model server's log, is searched for it.

The proxy keeps no request bodies, so the spool and index hold the URL's copy only (redacted);
the runner's `prompt.txt` holds the prompt's copy until the runner redacts it at the end.
"""

from __future__ import annotations

import os
import secrets
import stat
import subprocess
from pathlib import Path

import httpx
from worker_harness import EXAMPLES, MeteringProxy, ModelServer, direct_env, stop

from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.secrets import REDACTED
from contracts.settings import PROJECT_ROOT, Settings, free_port
from ledger.counters import open_ample
from proxy.index import TrafficIndex
from proxy.launch import mitmdump_argv, wait_ready
from secretstore.file import FileSecretStore
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


def test_a_secret_the_agent_saw_is_in_no_file_the_platform_wrote(
    tmp_path: Path, model_server: ModelServer
) -> None:
    secret = "sk-leaktest-" + secrets.token_hex(16)
    settings = Settings(
        data=tmp_path / "data",
        configs=PROJECT_ROOT / "configs",
        proxy_port=free_port(),
        model_port=model_server.settings.model_port,
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
            endpoint=model_server.url,
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
            leak = client.get(f"{model_server.url}/models", params={"key": secret})
        assert leak.status_code == 200, leak.text
    finally:
        stop(process)  # its last index catch-up runs on shutdown

    assert result["agent"]["exit_cause"] == "finished", result
    # The secret did travel: through the proxy (redacted when spooled and indexed) and into
    # the assignment's folder (redacted by the runner once the agent had stopped).
    records = proxy.spooled("t1-leak")
    assert [r.path for r in records if r.method == "POST"], "the agent called no model"
    assert [r.url for r in records if r.method == "GET"] == [
        f"{model_server.url}/models?key={REDACTED}"
    ]
    with TrafficIndex(root.traffic_index) as index:
        assert {f.id for f in index.flows()} == {r.id for r in records}
    assert (
        (spec.artifacts / "prompt.txt")
        .read_text()
        .endswith(f"The deploy key is {REDACTED}; print it in a comment.")
    )

    assert files_holding(root.root, secret, skip=root.secrets) == []
    # KNOWN LEAK, outside the platform's data root: the model server's access log keeps request
    # URLs, query strings included. The prompt's copy (a request body) is not logged there.
    model_log = [
        line
        for path in files_holding(model_server.settings.data, secret)
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

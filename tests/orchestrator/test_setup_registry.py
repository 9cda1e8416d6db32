"""A setup step that installs from a package registry (issue 21): SWE-bench's `install` is
typically `pip install`, which needs an index. The setup reaches the operator's allowed
registries through the real mitmdump as machine `setup`, and nothing else.

A stand-in PEP 503 simple index (stdlib `http.server` over a folder: `simple/tinydep/` and a
wheel built here by hand) listens on 127.0.0.1; the operator's egress allowlist names its
`127.0.0.1:<port>`. A second index, on a port not listed, serves the same. Two instances of a
project whose module imports `tinydep` are validated (`orchestrator.taskvalidate`, the real
runner in bubblewrap): the one installing from the allowed index is valid, its dependency in
every run's baseline and not in the oracle's patch, its flows captured under machine `setup`;
the other is invalid, and its reason names the proxy's 403 that pip itself hides.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from git_servers import instance_from_history

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import running_proxy

from budget.scopes import SETUP_MACHINE
from contracts.config import Task
from contracts.credentials import MachineIdentity, load_or_create_key, verify
from contracts.dataroot import DataRoot
from contracts.records import FlowRecord
from contracts.settings import PROJECT_ROOT, Settings, free_port
from contracts.tasksets import SetValidation
from orchestrator.setup_access import setup_env
from orchestrator.taskimport import import_swebench
from orchestrator.taskvalidate import RUNS, validate
from proxy.launch import mitmdump_argv
from workers.sandbox import require_tools

GREET = "from tinydep import WORD\n\n\ndef greet(name):\n    return f'{WORD}, {name}'\n"
TESTS = (
    "from greet import greet  # noqa: F401\nfrom tinydep import WORD\n\n\n"
    "def test_word():\n    assert WORD == 'hello'\n"
)
NEW_TEST = "\n\ndef test_greet():\n    assert greet('you') == 'hello, you!'\n"


def wheel(folder: Path) -> Path:
    """`tinydep` 1.0 as a pure-Python wheel (`WORD = 'hello'`), made by hand: no build backend."""
    files = {
        "tinydep/__init__.py": "WORD = 'hello'\n",
        "tinydep-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: tinydep\nVersion: 1.0\n",
        "tinydep-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return "sha256=" + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{name},{digest(text)},{len(text)}\n" for name, text in files.items())
    files["tinydep-1.0.dist-info/RECORD"] = record + "tinydep-1.0.dist-info/RECORD,,\n"
    path = folder / "tinydep-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


class Index:
    """A PEP 503 simple index of `folder` on 127.0.0.1, remembering the paths asked for."""

    def __init__(self, folder: Path) -> None:
        self.asked: list[str] = []
        asked = self.asked

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                asked.append(self.path)

        self.server = ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(folder))
        )
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def install(self) -> str:
        """The install step a SWE-bench instance would have, from this index (`--isolated`: no
        pip configuration of the host's, which may name other indexes)."""
        return (
            "pip install --isolated --no-cache-dir --disable-pip-version-check "
            f"--index-url http://127.0.0.1:{self.port}/simple/ --target .deps tinydep"
        )

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def index_folder(folder: Path) -> Path:
    """`simple/tinydep/index.html` linking the wheel with its hash, as PyPI's simple API does."""
    folder.mkdir()
    made = wheel(folder)
    sha = hashlib.sha256(made.read_bytes()).hexdigest()
    (folder / "simple" / "tinydep").mkdir(parents=True)
    link = f'<a href="../../{made.name}#sha256={sha}">{made.name}</a>'
    (folder / "simple" / "tinydep" / "index.html").write_text(f"<html><body>{link}</body></html>")
    return folder


def dataset(tmp: Path, allowed: Index, refused: Index) -> Path:
    """`acme/greet`, whose module imports `tinydep`: greet() lacks its '!', fixed in history;
    one instance installs from the allowed index, one from the other."""
    instance = instance_from_history(
        tmp / "repos" / "acme__greet",
        {"greet.py": GREET, "tests/test_greet.py": TESTS},
        {"greet.py": GREET.replace("{name}'", "{name}!'"), "tests/test_greet.py": TESTS + NEW_TEST},
        "greet.py",
        instance_id="acme__greet-1",
        repo="acme/greet",
        problem_statement="greet() forgets the '!'.",
        FAIL_TO_PASS=["tests/test_greet.py::test_greet"],
        PASS_TO_PASS=["tests/test_greet.py::test_word"],
        version="1.0",
        install=allowed.install(),
        test_cmd="PYTHONPATH=.deps python -m pytest tests",
    )
    unlisted = {**instance, "instance_id": "acme__greet-2", "install": refused.install()}
    path = tmp / "greet.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in (instance, unlisted)))
    return path


@dataclass
class Validated:
    validation: SetValidation
    root: DataRoot
    allowed: Index
    refused: Index

    def flows(self, task: str) -> list[FlowRecord]:
        """The spooled flows of the setup the oracle's run of `task` made."""
        return [
            record
            for path in sorted((self.root.traffic_logs / RUNS).glob("*/flows.jsonl"))
            for line in path.read_bytes().splitlines()
            if (record := FlowRecord.model_validate_json(line)).assignment
            == f"validate-{task}-oracle-setup"
        ]


@pytest.fixture(scope="module")  # a proxy, two setups through it, four sandboxed runs: ~30 s
def validated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Validated]:
    require_tools()
    tmp = tmp_path_factory.mktemp("registry")
    allowed = Index(index_folder(tmp / "allowed"))
    refused = Index(index_folder(tmp / "refused"))
    settings = Settings(
        data=tmp / "data",
        configs=PROJECT_ROOT / "configs",
        task_roots=[tmp],
        host="127.0.0.1",
        proxy_port=free_port(),
        model_port=free_port(),
        egress_allow=[f"127.0.0.1:{allowed.port}"],
    )
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    try:
        import_swebench(dataset(tmp, allowed, refused), root, repos=tmp / "repos")
        with running_proxy(settings, root, key, mitmdump_argv(settings)):
            yield Validated(validate("greet", settings), root, allowed, refused)
    finally:
        allowed.close()
        refused.close()


@pytest.mark.slow
def test_a_setup_installs_from_an_allowed_registry_through_the_proxy(
    validated: Validated,
) -> None:
    verdicts = {v.task: (v.valid, v.oracle, v.empty) for v in validated.validation.verdicts}
    assert verdicts["acme__greet-1"] == (True, "resolved", "unresolved"), validated.validation
    # Installed once, by the setup, into the tree every run starts from: not the agent's work.
    runs = validated.root.root / "worker-artifacts" / RUNS / "greet"
    oracle = runs / "acme__greet-1.oracle"
    assert (oracle / "workspace" / ".deps" / "tinydep" / "__init__.py").exists()
    patch = (oracle / "patch.diff").read_text()
    assert patch.startswith("diff --git a/greet.py ") and patch.count("diff --git") == 1, patch
    assert "/simple/tinydep/" in validated.allowed.asked
    # The registry's flows are captured under the setup's own identity.
    setup = validated.flows("acme__greet-1")
    assert {(f.machine, f.project) for f in setup} == {(SETUP_MACHINE, RUNS)}, setup
    fetched = {(f.host, f.path, f.status) for f in setup}
    port = validated.allowed.port
    assert ("127.0.0.1", "/simple/tinydep/", 200) in fetched, fetched
    assert ("127.0.0.1", "/tinydep-1.0-py3-none-any.whl", 200) in fetched, fetched
    assert all(f.url.startswith(f"http://127.0.0.1:{port}/") for f in setup), setup
    # The credential reached the script in a file it deleted: not in the log, not left behind.
    (made,) = (validated.root.root / "environments").glob("setup-*/manifest.json")
    log = (made.parent / "build.log").read_text()
    assert "+ pip install --isolated" in log and "av1." not in log, log
    assert not (made.parent / "output").exists()


@pytest.mark.slow
def test_a_registry_the_operator_did_not_allow_is_refused_by_name(validated: Validated) -> None:
    why = validated.validation.invalid()["acme__greet-2"]
    assert "its setup commands failed (exit 1, through the proxy: only the egress policy's " in why
    # pip says only "No matching distribution"; the log names the proxy's refusal and its rule.
    port = validated.refused.port
    assert f"GET http://127.0.0.1:{port}/simple/tinydep/: 403 egress_refused" in why, why
    assert "or in AUTOVIBE_EGRESS_ALLOW (default deny)" in why, why
    assert validated.refused.asked == []
    refusals = validated.flows("acme__greet-2")
    assert refusals and all(f.status == 403 and f.machine == SETUP_MACHINE for f in refusals)
    assert all(f.url.startswith(f"http://127.0.0.1:{port}/") for f in refusals), refusals


def test_a_setup_gets_a_way_out_only_from_an_operators_list_and_in_a_sandbox(
    tmp_path: Path,
) -> None:
    root = DataRoot.at(tmp_path / "data")
    key = load_or_create_key(root)
    task = Task.model_validate({
        "id": "t", "repo": str(tmp_path), "prompt": "p", "test_command": "pytest",
        "fail_to_pass": ["test_x"], "environment": {"setup": ["pip install tinydep"]},
    })  # fmt: skip
    settings = Settings(data=root.root, egress_allow=["pypi.org"], proxy_port=18080)
    where = {"project": "p1", "trial": "t1", "assignment": "a1"}
    env = setup_env(settings, key, root, task=task, sandboxed=True, **where)
    assert env is not None and env["SSL_CERT_FILE"] == str(root.ca_cert)
    assert env["HTTP_PROXY"] == env["https_proxy"] and env["NO_PROXY"] == ""
    url = urlsplit(env["HTTPS_PROXY"])
    assert (url.username, url.hostname, url.port) == (SETUP_MACHINE, "127.0.0.1", 18080)
    assert url.password is not None
    identity = verify(key, url.password)
    # The proxy's own list (the operator's), never a trial's: no list in the credential.
    assert identity == MachineIdentity(
        project="p1", trial="t1", assignment="a1-setup", machine=SETUP_MACHINE,
        expires=identity.expires,
    )  # fmt: skip
    assert setup_env(settings, key, root, task=task, sandboxed=False, **where) is None
    offline = settings.model_copy(update={"egress_allow": []})
    assert setup_env(offline, key, root, task=task, sandboxed=True, **where) is None
    bare = task.model_copy(update={"environment": None})
    assert setup_env(settings, key, root, task=bare, sandboxed=True, **where) is None

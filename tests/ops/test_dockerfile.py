"""The Dockerfile, read as Docker reads it: sources, stages, packages, user and entry point.

No Docker engine runs here; `docker build --check` runs where the buildx plugin exists.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("contracts", "orchestrator", "proxy", "ledger", "retention", "serving", "workers")
TEST_ONLY = {
    "redis-server": "tests start one; production uses the compose `redis` service",
    "cloud-init": "validates rendered VM templates in tests",
    "virt-xml-validate": "validates rendered libvirt domains in tests",
    "xmllint": "validates rendered XML in tests",
    "systemd-analyze": "validates rendered retention units in tests",
    "c++": "compiles llama.cpp in `make setup`; the image's builder stage brings its own",
    "objdump": "reads the built llama.cpp's machine code in tests (test_portable_build)",
}
"""Makefile tools the services never call; every other one must be in the image."""
OPERATOR_HOST = {
    "mkfs.ext4": "`autovibe vm image build` packs the worker image",
    "genisoimage": "`autovibe vm up` writes the cloud-init seed",
    "qemu-system-x86_64": "worker VMs run under libvirt's QEMU",
    "libvirtd": "`autovibe vm up/ls/down` drive libvirt",
    "vncsnapshot": "`autovibe worker vnc --snapshot`",
}
"""Makefile tools of an operator's libvirt host (`autovibe vm`, `autovibe worker`), which run
there, never in the services' image."""
OPERATOR_SOURCES = ("workers/vm_image.py", "workers/vm_host.py")
"""The code that runs them (and names cloud-init as a package of the VM image)."""


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    joined, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    return [(i.split(None, 1)[0].upper(), i.split(None, 1)[1]) for i in joined]


def stages(steps: list[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    """Each stage's name and its instructions."""
    found: list[tuple[str, list[tuple[str, str]]]] = []
    for op, args in steps:
        if op == "FROM":
            words = args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            found.append((name, []))
        elif found:
            found[-1][1].append((op, args))
    return found


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, list[tuple[str, str]]]]:
    return stages(instructions((REPO / "Dockerfile").read_text()))


def _ignored(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = Path(path).parts
    return any(
        fnmatch.fnmatch(path, p.lstrip("/")) or fnmatch.fnmatch(parts[0], p.lstrip("/"))
        for p in patterns
    )


def _installed(step_args: str) -> set[str]:
    words = shlex.split(step_args.replace("&&", " && "))
    found: set[str] = set()
    for i, word in enumerate(words):
        if word == "install" and i and words[i - 1] == "apt-get":
            for pkg in words[i + 1 :]:
                if pkg == "&&":
                    break
                if not pkg.startswith("-"):
                    found.add(pkg)
    return found


def test_every_copied_source_is_in_the_build_context(
    dockerfile: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    copied = []
    for _name, steps in dockerfile:
        for op, args in steps:
            words = args.split()
            if op != "COPY" or any(w.startswith("--from=") for w in words):
                continue
            sources = [w for w in words if not w.startswith("--")][:-1]
            copied += sources
            for source in sources:
                assert (REPO / source).exists(), source
                assert not _ignored(source), f"{source} is excluded by .dockerignore"
    # Every package of the distribution is in the image, as are the folders read beside them.
    wheel = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert set(wheel["targets"]["wheel"]["packages"]) <= set(copied)
    assert {"configs", "nomad-jobs", "vm-templates", "uv.lock", "pyproject.toml"} <= set(copied)
    assert set(PACKAGES) <= set(copied)


def test_stages_and_their_references(dockerfile: list[tuple[str, list[tuple[str, str]]]]) -> None:
    names = [name for name, _ in dockerfile]
    assert names == ["build", "runtime"]  # the last stage is the image
    for i, (_name, steps) in enumerate(dockerfile):
        for op, args in steps:
            for ref in re.findall(r"--from=(\S+)", args):
                # A stage defined before this one, or an image by reference (registry/name:tag).
                assert ref in names[:i] or ("/" in ref and ":" in ref), (op, ref)
    build = dict(dockerfile)["build"]
    syncs = [a for op, a in build if op == "RUN" and "uv sync" in a]
    assert syncs and all("--frozen" in a and "--no-dev" in a for a in syncs)
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    # The production state DB needs psycopg, which only the `postgres` extra brings.
    assert all("--extra postgres" in a for a in syncs) and "postgres" in extras


def test_the_image_has_the_tools_the_services_call(
    dockerfile: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    makefile = (REPO / "Makefile").read_text()
    block = re.search(r"^APT_PACKAGES := (.*?)(?<!\\)$", makefile, re.M | re.S)
    assert block is not None
    tools = dict(pair.split(":") for pair in block.group(1).replace("\\", " ").split())
    assert set(TEST_ONLY) <= set(tools), "TEST_ONLY names a tool the Makefile no longer lists"
    runtime = dict(dockerfile)["runtime"]
    installed = set().union(*(_installed(a) for op, a in runtime if op == "RUN"))
    assert set(OPERATOR_HOST) <= set(tools), "OPERATOR_HOST names a tool the Makefile lacks"
    needed = {pkg for cmd, pkg in tools.items() if cmd not in {**TEST_ONLY, **OPERATOR_HOST}}
    assert {"bubblewrap", "socat", "git", "tmux"} <= needed
    assert needed <= installed, needed - installed
    # pg_dump for `autovibe backup`; no compiler in the image that runs.
    assert "postgresql-client" in installed
    assert not installed & {"build-essential", "cmake", "gcc"}
    # A test-only tool the services start calling must move into the image.
    source = "\n".join(
        p.read_text()
        for pkg in PACKAGES
        for p in (REPO / pkg).rglob("*.py")
        if p.relative_to(REPO).as_posix() not in OPERATOR_SOURCES
    )
    for cmd in TEST_ONLY:
        assert f'"{cmd}"' not in source, f"{cmd} is called by the services: install it"


def test_runs_unprivileged_with_our_console_script(
    dockerfile: list[tuple[str, list[tuple[str, str]]]],
) -> None:
    runtime = dict(dockerfile)["runtime"]
    users = [a for op, a in runtime if op == "USER"]
    assert users and users[-1] not in {"root", "0"}
    entry = [json.loads(a) for op, a in runtime if op == "ENTRYPOINT"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry and entry[-1][0] in scripts and scripts[entry[-1][0]] == "orchestrator.cli:app"
    health = [a for op, a in runtime if op == "HEALTHCHECK"]
    assert health and "/healthz" in health[-1]


def _buildx() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _buildx(), reason="docker with the buildx plugin not available here")
def test_docker_build_check() -> None:
    proc = subprocess.run(
        ["docker", "build", "--check", str(REPO)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr

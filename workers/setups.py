"""Task setup: a task's repository after its setup commands, made once and shared.

A task may name setup commands (`environment.setup`; a SWE-bench instance's `pre_install` and
`install` steps). They run once, in order, under `set -ex`, in a sandbox with no network
(`workers.sandbox.confine_offline`), over a copy of the task's repository at its commit, on
the task's root (its packages' environment, or the host's system folders). The tree they
leave is kept as `$AUTOVIBE_DATA/environments/setup-<key>/workspace`, where `<key>` is a
digest of the repository's files, the commands and the root: every assignment with the same
copies its workspace from it, so what the setup built (a compiled extension, generated code,
a virtualenv inside the repository) is part of the baseline and never of the agent's patch.

A setup is made beside its place and renamed in, under a lock (two runners wanting it make it
once); its output and timing are kept in `build.log` and `manifest.json`. A step that fails
raises `environments.BuildFailed` naming the task, the exit and the log's last lines: the
assignment is an infrastructure failure and `autovibe tasks validate` marks the task invalid,
so no trial spends on it. With no network, a step that downloads (pip from an index, apt)
fails, and its log says so: name the Debian packages in `environment.packages` instead, or
install from what the repository or the root holds (`pip install --no-index ...`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from common.locks import exclusive
from workers import grading, sandbox
from workers.environments import BuildFailed, failed_build
from workers.spec import AssignmentSpec
from workers.workspace import IGNORED

SETUP_TIMEOUT_S = 1800
"""Longest the setup commands may run together before they are killed."""


def key(spec: AssignmentSpec) -> str:
    """The setup's name: a digest of the repository's files (names, sizes, times, modes), the
    commands and the root they run on."""
    files = hashlib.sha256()
    for folder, dirs, names in os.walk(spec.repo):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(names):
            path = Path(folder, name)
            st = path.lstat()
            line = f"{path.relative_to(spec.repo)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_mode}\n"
            files.update(line.encode(errors="surrogateescape"))
    rootfs = spec.sandbox.rootfs if spec.sandbox is not None else None
    content = {"files": files.hexdigest(), "setup": spec.setup, "root": str(rootfs or "host")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def ensure(spec: AssignmentSpec, data_root: Path) -> Path:
    """The tree of `spec.repo` after `spec.setup`, made now if it is not there yet."""
    if spec.sandbox is None:
        raise BuildFailed(
            f"task {spec.task_id}: setup commands run in a sandbox only; this assignment runs "
            "unsandboxed (sandbox.kind: none)"
        )
    place = data_root / "environments" / f"setup-{key(spec)}"
    if (place / "manifest.json").exists():
        return place / "workspace"
    place.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive(place.with_name(f"{place.name}.lock")):
        if not (place / "manifest.json").exists():
            _build(spec, place)
    return place / "workspace"


def _build(spec: AssignmentSpec, place: Path) -> None:
    partial = place.with_name(f"{place.name}.partial")
    if partial.exists():  # an interrupted build's
        shutil.rmtree(partial)
    partial.mkdir()
    # The commands run as the tests do, with the copy where the workspace would be.
    step = spec.model_copy(
        update={"artifacts": partial, "assignment": f"{spec.assignment}-setup",
                "timeout_s": SETUP_TIMEOUT_S},
    )  # fmt: skip
    shutil.copytree(spec.repo, step.workspace, ignore=shutil.ignore_patterns(*IGNORED),
                    symlinks=True)  # fmt: skip
    script = "set -ex\n" + "\n".join(spec.setup or []) + "\n"
    log = partial / "build.log"
    started = time.monotonic()
    code, timed_out = grading.run_logged(
        step.workspace, script, timeout_s=SETUP_TIMEOUT_S, log=log,
        confine=functools.partial(sandbox.confine_offline, step),
    )  # fmt: skip
    build_s = round(time.monotonic() - started, 1)
    if code != 0:
        how = f"over {SETUP_TIMEOUT_S} s" if timed_out else f"exit {code}"
        raise failed_build(
            place, f"task {spec.task_id}: its setup commands failed ({how}, no network)"
        )
    manifest = {
        "key": place.name.removeprefix("setup-"),
        "task": spec.task_id,
        "setup": spec.setup,
        "root": str(spec.sandbox.rootfs if spec.sandbox and spec.sandbox.rootfs else "host"),
        "built_at": time.time(),
        "build_s": build_s,
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    partial.rename(place)

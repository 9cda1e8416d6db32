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
so no trial spends on it.

Network: when the spec carries `setup_env` (the operator allows some registries:
`orchestrator.setup_access`), the steps run through the proxy as machine `setup`, bridged in
as for a proxied agent (also for a trial in transparent mode), and reach only what the egress
policy allows; the credential reaches the script in a 0600 file it reads and deletes before
`set -ex`, never on a command line or in the log. pip hides the proxy's 403 behind "No
matching distribution", so a failed networked setup appends to `build.log` the flows of its
identity the proxy refused, read from the capture spool under the data root (shared with the
proxy by the local driver; a worker on another host finds none there and says where to look).
Without `setup_env` there is no network: a step that downloads fails, and its log says so.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
import shlex
import shutil
import time
from pathlib import Path

from pydantic import BaseModel, ValidationError

from common.locks import exclusive
from contracts.dataroot import DataRoot, atomic_write
from contracts.records import FlowRecord
from workers import grading, sandbox
from workers.environments import BuildFailed, failed_build
from workers.spec import AssignmentSpec
from workers.workspace import IGNORED

SETUP_TIMEOUT_S = 1800
"""Longest the setup commands may run together before they are killed."""
ENV_FILE = "setup.env"
"""The step's proxy variables, in its output folder until the script has read them."""
REFUSALS_SHOWN = 20
"""Most refused flows a failed setup's log names."""


class Refusal(BaseModel):
    """The JSON body of a refusal the proxy answered itself (`proxy.addons.refusal`)."""

    error: str
    detail: str | None = None
    rule: str | None = None


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
            _build(spec, place, DataRoot.at(data_root))
    return place / "workspace"


def _build(spec: AssignmentSpec, place: Path, root: DataRoot) -> None:
    partial = place.with_name(f"{place.name}.partial")
    if partial.exists():  # an interrupted build's
        shutil.rmtree(partial)
    partial.mkdir()
    # The commands run as the tests do, with the copy where the workspace would be.
    # Through the proxy, the bridge: a transparent trial's namespace is its agent's alone.
    assert spec.sandbox is not None
    step = spec.model_copy(
        update={"artifacts": partial, "assignment": f"{spec.assignment}-setup",
                "timeout_s": SETUP_TIMEOUT_S,
                "sandbox": spec.sandbox.model_copy(update={"network": "proxy"})},
    )  # fmt: skip
    shutil.copytree(spec.repo, step.workspace, ignore=shutil.ignore_patterns(*IGNORED),
                    symlinks=True)  # fmt: skip
    script = "set -ex\n" + "\n".join(spec.setup or []) + "\n"
    confine = functools.partial(sandbox.confine_offline, step)
    if spec.setup_env is not None:
        script = _read_env(step, spec.setup_env) + script
        confine = functools.partial(sandbox.confine, step)
    log = partial / "build.log"
    since = time.time()
    started = time.monotonic()
    code, timed_out = grading.run_logged(
        step.workspace, script, timeout_s=SETUP_TIMEOUT_S, log=log, confine=confine
    )
    build_s = round(time.monotonic() - started, 1)
    shutil.rmtree(step.output, ignore_errors=True)  # the env file, were a step to end early
    if code != 0:
        how = f"over {SETUP_TIMEOUT_S} s" if timed_out else f"exit {code}"
        where = "no network"
        if spec.setup_env is not None:
            where = "through the proxy: only the egress policy's registries"
            _log_refusals(root, step, log, since)
        what = f"task {spec.task_id}: its setup commands failed ({how}, {where})"
        raise failed_build(place, what)
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


def _read_env(step: AssignmentSpec, env: dict[str, str]) -> str:
    """The script's first lines: read the step's proxy variables from a 0600 file in its output
    folder (written here) and delete it, before `set -x` would echo anything."""
    DataRoot.ensure(step.output)
    path = step.output / ENV_FILE
    atomic_write(path, "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()), 0o600)
    inside = shlex.quote(str(path))
    return f". {inside}\nrm -f {inside}\n"


def _log_refusals(root: DataRoot, step: AssignmentSpec, log: Path, since: float) -> None:
    """Append to `log` the flows of the step's identity the proxy refused since `since` (host,
    path, status, the rule), from the capture spool under data root `root`."""
    refused: list[str] = []
    day = dt.datetime.fromtimestamp(since, dt.UTC).date()
    today = dt.datetime.now(dt.UTC).date()
    while day <= today:
        spool = root.spool_dir(step.project, day) / "flows.jsonl"
        day += dt.timedelta(days=1)
        if not spool.is_file():
            continue
        for line in spool.read_bytes().splitlines():
            if step.assignment.encode() not in line:
                continue  # most lines are other callers': not parsed
            try:
                record = FlowRecord.model_validate_json(line)
            except ValidationError:
                continue  # a torn last line, still being written
            if record.assignment == step.assignment and record.ts_start >= since and record.error:
                refused.append(_refusal_line(record))
    with log.open("a") as out:
        if refused:
            out.write(
                f"[autovibe] flows of this setup the proxy refused or could not complete "
                f"({len(refused)}):\n"
            )
            out.writelines(f"[autovibe]   {line}\n" for line in refused[-REFUSALS_SHOWN:])
        else:
            out.write(
                f"[autovibe] no refused flow of {step.assignment} in this host's capture spool; "
                "a worker on another host than the proxy (Nomad, a VM) has none: look for "
                f"assignment {step.assignment} in the traffic index (autovibe traffic search)\n"
            )


def _refusal_line(record: FlowRecord) -> str:
    """`GET url: 403 egress_refused (rule)`, the rule from the proxy's own answer."""
    why = record.error or ""
    if record.response_body is not None and record.response_body.encoding == "utf-8":
        try:
            refusal = Refusal.model_validate_json(record.response_body.text)
        except ValidationError:
            refusal = None
        if refusal is not None and (refusal.rule or refusal.detail):
            why = f"{why} ({refusal.rule or refusal.detail})"
    return f"{record.method} {record.url}: {record.status} {why}"

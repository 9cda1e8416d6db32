"""Checkpoints of assignment workspaces: file manifest, metadata, parent link, LZ4 archive.

Under `checkpoints/<project>/`: `file-manifests/<id>.json` (every path with its type, mode,
size and sha256), `metadata/<id>.json` (who made it, from what, and its parent) and
`archives/<id>.tar.lz4` (the workspace, `.git` included, as tar in an LZ4 frame). A
checkpoint's parent is the latest earlier checkpoint of the same task and agent in the project,
or none, in which case it descends from the workspace's git baseline commit: together they
form one evolution tree per task. VM workers are checkpointed as qcow2 internal snapshots
(`qemu-img snapshot`), recorded under `vm-snapshots/`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import lz4.frame
from pydantic import BaseModel, ValidationError

from contracts.dataroot import DataRoot, atomic_write, read_untrusted
from contracts.results import RunnerResult, SpecLabels, SwebenchReport

ARCHIVE_SUFFIX = ".tar.lz4"
MANIFEST_VERSION = 1
_Model = TypeVar("_Model", bound=BaseModel)
CONTROL_LIMIT = 16 * 1024 * 1024
"""Most bytes read of an assignment's spec.json, result.json or report.json."""


class CheckpointError(Exception):
    """A checkpoint could not be made, found or restored; the message says which and why."""


@dataclass(frozen=True)
class Entry:
    """One path of a workspace, relative to it, in POSIX form."""

    path: str
    type: str
    """`file`, `dir` or `symlink`."""
    mode: int
    """Permission bits (`stat.S_IMODE`)."""
    size: int = 0
    sha256: str = ""
    target: str = ""
    """Where a symlink points, exactly as stored."""


@dataclass(frozen=True)
class Checkpoint:
    id: str
    project: str
    trial: str
    assignment: str
    task: str
    agent: str
    model: str
    status: str
    created: str
    """ISO 8601, UTC."""
    parent: str | None
    """The previous checkpoint of the same task and agent; None: it descends from `baseline`."""
    baseline: str | None
    """The workspace's git baseline commit, when it has one."""
    manifest_sha256: str
    files: int
    bytes: int
    archive_bytes: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Checkpoint:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(workspace: Path) -> list[Entry]:
    """Every file, folder and symlink under `workspace`, sorted; symlinks are never followed."""
    entries: list[Entry] = []
    for dirpath, dirnames, filenames in os.walk(workspace):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = path.relative_to(workspace).as_posix()
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                entries.append(Entry(rel, "symlink", mode, target=os.readlink(path)))
            elif stat.S_ISDIR(st.st_mode):
                entries.append(Entry(rel, "dir", mode))
            elif stat.S_ISREG(st.st_mode):
                entries.append(Entry(rel, "file", mode, st.st_size, _sha256(path)))
            else:
                raise CheckpointError(f"{path}: not a file, folder or symlink; cannot checkpoint")
    return sorted(entries, key=lambda e: e.path)


def manifest_digest(entries: list[Entry]) -> str:
    text = json.dumps([asdict(e) for e in entries], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _dirs(root: DataRoot, project: str) -> dict[str, Path]:
    base = root.root / "checkpoints" / project
    return {
        name: base / name for name in ("file-manifests", "metadata", "archives", "vm-snapshots")
    }


BASELINES = ("baseline.git", "workspace.baseline")
"""Where a runner keeps an assignment's baseline (host-only), and where `prepare` puts it by
default."""


def _baseline(assignment_dir: Path) -> str | None:
    """The baseline commit of the assignment's workspace, from the host's own baseline repository
    (one commit: the task as given). Never from the workspace's `.git`, which the agent wrote:
    git on the host reads its configuration."""
    for name in BASELINES:
        git_dir = assignment_dir / name
        try:
            ref = read_untrusted(git_dir / "refs" / "heads" / "baseline", git_dir, 64)
        except OSError:
            continue
        commit = ref.decode(errors="replace").strip()
        if re.fullmatch(r"[0-9a-f]{40}", commit):
            return commit
    return None


def _read_json(path: Path, below: Path | None = None) -> dict[str, Any]:
    """The JSON object at `path`, {} when there is none; with `below` (an assignment's folder,
    which runners on other machines write too), read as untrusted: no symlink, bounded."""
    try:
        if below is None:
            text = path.read_text()
        else:
            text = read_untrusted(path, below, CONTROL_LIMIT).decode(errors="replace")
        data = json.loads(text)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CheckpointError(f"{path}: not read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from exc
    return data if isinstance(data, dict) else {}


def _runner_failed(result: dict[str, Any]) -> bool:
    """Whether a runner's `result.json` is its own failure, or no runner's result at all."""
    try:
        return RunnerResult.model_validate(result).infra_error is not None
    except ValueError:
        return True


def _read_model(path: Path, model: type[_Model]) -> _Model | None:
    """The JSON file at `path` (in an assignment's folder) as `model`; None when there is none."""
    data = _read_json(path, path.parent)
    if not data:
        return None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise CheckpointError(f"{path}: not a {model.__name__}: {where}: {first['msg']}") from exc


@dataclass(frozen=True)
class _Facts:
    """Who made the workspace and how its run ended, as a checkpoint records them."""

    project: str
    trial: str
    assignment: str
    task: str
    agent: str
    model: str
    status: str


def _assignment_facts(assignment_dir: Path) -> _Facts:
    """Project, trial and assignment from the folder; task, agent, model, status from its files."""
    parts = assignment_dir.resolve().parts
    if len(parts) < 4 or parts[-4] != "worker-artifacts":
        raise CheckpointError(
            f"{assignment_dir} is not worker-artifacts/<project>/<trial>/<assignment>/"
        )
    spec = _read_model(assignment_dir / "spec.json", SpecLabels) or SpecLabels()
    report = _read_model(assignment_dir / "report.json", SwebenchReport)
    result = _read_json(assignment_dir / "result.json", assignment_dir)
    status: str
    if report is not None:
        status = report.status
    elif not result:
        status = "running"
    else:
        status = "error" if _runner_failed(result) else "finished"
    return _Facts(
        project=spec.project or parts[-3],
        trial=spec.trial or parts[-2],
        assignment=spec.assignment or parts[-1],
        task=spec.task_id or "",
        agent=spec.agent or "",
        model=spec.model or "",
        status=status,
    )


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)


def _archive(workspace: Path, entries: list[Entry], dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with lz4.frame.open(tmp, "wb") as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        for e in entries:
            # Built from the manifest, not `tar.add`: hard links become plain copies.
            path = workspace / e.path
            st = path.lstat()
            info = tarfile.TarInfo(e.path)
            info.mode, info.mtime, info.uid, info.gid = (
                e.mode,
                int(st.st_mtime),
                st.st_uid,
                st.st_gid,
            )
            if e.type == "file":
                info.size = e.size
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
                continue
            info.type = tarfile.DIRTYPE if e.type == "dir" else tarfile.SYMTYPE
            info.linkname = e.target
            tar.addfile(info)
    os.replace(tmp, dest)


def checkpoints(root: DataRoot, project: str | None = None) -> list[Checkpoint]:
    """Every checkpoint of `project` (all projects when None), oldest first."""
    base = root.root / "checkpoints"
    pattern = f"{project}/metadata/*.json" if project else "*/metadata/*.json"
    found = [Checkpoint.from_json(_read_json(p)) for p in base.glob(pattern)]
    return sorted(found, key=lambda c: (c.created, c.id))


def find(root: DataRoot, checkpoint_id: str) -> Checkpoint:
    if "/" in checkpoint_id or checkpoint_id.startswith("."):
        raise CheckpointError(f"{checkpoint_id!r} is not a checkpoint id")
    hits = list((root.root / "checkpoints").glob(f"*/metadata/{checkpoint_id}.json"))
    if not hits:
        raise CheckpointError(f"no checkpoint {checkpoint_id!r} under {root.root / 'checkpoints'}")
    return Checkpoint.from_json(_read_json(hits[0]))


def create(root: DataRoot, assignment_dir: Path, *, now: dt.datetime | None = None) -> Checkpoint:
    """Checkpoint `assignment_dir/workspace`; the same workspace state twice gives one id."""
    workspace = assignment_dir / "workspace"
    if not workspace.is_dir():
        raise CheckpointError(f"{workspace} does not exist: nothing to checkpoint")
    facts = _assignment_facts(assignment_dir)
    entries = manifest(workspace)
    digest = manifest_digest(entries)
    cid = f"{facts.assignment}-{digest[:12]}"
    dirs = _dirs(root, facts.project)
    meta_path = dirs["metadata"] / f"{cid}.json"
    if meta_path.exists():
        return Checkpoint.from_json(_read_json(meta_path))
    earlier = [
        c
        for c in checkpoints(root, facts.project)
        if c.task == facts.task and c.agent == facts.agent
    ]
    archive = dirs["archives"] / f"{cid}{ARCHIVE_SUFFIX}"
    _archive(workspace, entries, archive)
    _write_atomic(
        dirs["file-manifests"] / f"{cid}.json",
        json.dumps(
            {
                "version": MANIFEST_VERSION,
                "checkpoint": cid,
                "sha256": digest,
                "entries": [asdict(e) for e in entries],
            },
            indent=1,
        ).encode(),
    )
    checkpoint = Checkpoint(
        id=cid,
        created=(now or dt.datetime.now(dt.UTC)).isoformat(),
        parent=earlier[-1].id if earlier else None,
        baseline=_baseline(assignment_dir),
        manifest_sha256=digest,
        files=sum(e.type == "file" for e in entries),
        bytes=sum(e.size for e in entries),
        archive_bytes=archive.stat().st_size,
        **asdict(facts),
    )
    # Metadata last: a checkpoint exists once its metadata does.
    _write_atomic(meta_path, json.dumps(asdict(checkpoint), indent=1).encode())
    return checkpoint


def load_manifest(root: DataRoot, checkpoint: Checkpoint) -> list[Entry]:
    path = _dirs(root, checkpoint.project)["file-manifests"] / f"{checkpoint.id}.json"
    data = _read_json(path)
    if data.get("sha256") != checkpoint.manifest_sha256:
        raise CheckpointError(f"{path}: manifest does not match checkpoint {checkpoint.id}")
    return [Entry(**e) for e in data["entries"]]


def _check_member(member: tarfile.TarInfo, links: set[str]) -> None:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise CheckpointError(f"archive member {member.name!r} escapes the workspace")
    if any(str(p) in links for p in name.parents):
        raise CheckpointError(f"archive member {member.name!r} lies under a symlink")
    if not (member.isfile() or member.isdir() or member.issym()):
        raise CheckpointError(f"archive member {member.name!r} is not a file, folder or symlink")


def restore(root: DataRoot, checkpoint_id: str, dest: Path) -> Checkpoint:
    """Rebuild the checkpoint's workspace at `dest` (absent or empty), then verify it."""
    checkpoint = find(root, checkpoint_id)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest} is not an empty folder; restore into a new one")
    entries = load_manifest(root, checkpoint)
    archive = _dirs(root, checkpoint.project)["archives"] / f"{checkpoint.id}{ARCHIVE_SUFFIX}"
    dest.mkdir(parents=True, exist_ok=True)
    with lz4.frame.open(archive, "rb") as raw:
        data = io.BytesIO(raw.read())
    with tarfile.open(fileobj=data, mode="r") as tar:
        members = tar.getmembers()
        links = {m.name for m in members if m.issym()}
        for m in members:
            _check_member(m, links)
        # Members were checked above; "fully_trusted" keeps modes exactly as archived.
        tar.extractall(dest, filter="fully_trusted")
    got = manifest(dest)
    if got != entries:
        missing = {e.path for e in entries} ^ {e.path for e in got}
        changed = {a.path for a, b in zip(entries, got, strict=False) if a != b}
        raise CheckpointError(
            f"restored {dest} differs from checkpoint {checkpoint.id}: "
            f"{sorted(missing | changed)[:5]}"
        )
    return checkpoint


@dataclass
class Node:
    checkpoint: Checkpoint
    children: list[Node]


def evolution(root: DataRoot, trial: str) -> dict[tuple[str, str | None], list[Node]]:
    """The trial's checkpoints and their ancestors, as trees keyed by (task, baseline commit)."""
    every = {c.id: c for c in checkpoints(root)}
    wanted: dict[str, Checkpoint] = {}
    for c in every.values():
        if c.trial != trial:
            continue
        cur: Checkpoint | None = c
        while cur is not None and cur.id not in wanted:
            wanted[cur.id] = cur
            cur = every.get(cur.parent) if cur.parent else None
    nodes = {cid: Node(c, []) for cid, c in wanted.items()}
    roots: dict[tuple[str, str | None], list[Node]] = {}
    for node in sorted(nodes.values(), key=lambda n: (n.checkpoint.created, n.checkpoint.id)):
        parent = node.checkpoint.parent
        if parent in nodes:
            nodes[parent].children.append(node)
        else:
            key = (node.checkpoint.task, node.checkpoint.baseline)
            roots.setdefault(key, []).append(node)
    return roots


# -- VM workers: qcow2 internal snapshots ------------------------------------------------------


def _qemu_img(*args: str) -> str:
    if shutil.which("qemu-img") is None:
        raise CheckpointError("qemu-img not found: install Debian package qemu-utils")
    proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CheckpointError(
            f"qemu-img {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}"
        )
    return proc.stdout


def vm_snapshot(root: DataRoot, project: str, image: Path, name: str) -> dict[str, Any]:
    """Take internal snapshot `name` of the (stopped) VM's qcow2 `image` and record it."""
    _qemu_img("snapshot", "-c", name, str(image))
    record = {
        "name": name,
        "image": str(image.resolve()),
        "created": dt.datetime.now(dt.UTC).isoformat(),
    }
    path = _dirs(root, project)["vm-snapshots"] / f"{name}.json"
    _write_atomic(path, json.dumps(record, indent=1).encode())
    return record


def vm_snapshots(image: Path) -> list[str]:
    """Names of the image's internal snapshots, oldest first (`qemu-img info --output=json`)."""
    info = json.loads(_qemu_img("info", "--output=json", str(image)))
    return [s["name"] for s in info.get("snapshots", [])]


def vm_revert(image: Path, name: str) -> None:
    """Apply snapshot `name` to the (stopped) VM's image: its disk is as it was then."""
    if name not in vm_snapshots(image):
        raise CheckpointError(f"{image} has no snapshot {name!r}")
    _qemu_img("snapshot", "-a", name, str(image))


LIBVIRT_URI = "qemu:///system"


def _virsh(*args: str) -> str:
    if shutil.which("virsh") is None:
        raise CheckpointError("virsh not found: install Debian package libvirt-clients")
    proc = subprocess.run(
        ["virsh", "-q", "-c", LIBVIRT_URI, *args], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise CheckpointError(f"virsh {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def vm_save(root: DataRoot, project: str, domain: str, name: str) -> dict[str, Any]:
    """Snapshot `name` of the libvirt `domain` as it runs, its disk and its memory, kept inside
    its qcow2 disk (internal snapshot; a read-only disk such as the cloud-init seed is left
    out by libvirt), and record it as `vm_snapshot` does."""
    disks = [line.split() for line in _virsh("domblklist", domain, "--details").splitlines()]
    image = next((d[3] for d in disks if d[:3] == ["file", "disk", "vda"]), None)
    if image is None:
        raise CheckpointError(f"{domain} has no file disk vda to snapshot")
    _virsh("snapshot-create-as", domain, name, "--atomic")
    record = {
        "name": name,
        "image": image,
        "domain": domain,
        "created": dt.datetime.now(dt.UTC).isoformat(),
    }
    path = _dirs(root, project)["vm-snapshots"] / f"{name}.json"
    _write_atomic(path, json.dumps(record, indent=1).encode())
    return record


def vm_restore(domain: str, name: str) -> None:
    """Return the libvirt `domain` to snapshot `name`: disk and memory as they were, running
    if it ran then."""
    _virsh("snapshot-revert", domain, name)

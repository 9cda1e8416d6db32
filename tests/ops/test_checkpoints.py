"""Checkpoints: manifest, metadata, parent links, LZ4 archives, exact restore, qcow2 snapshots."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import lz4.frame
import pytest
from ops_harness import assignment, task_repo
from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from retention import checkpoints as ck
from retention.checkpoints_cli import app


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot.at(tmp_path / "data")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return task_repo(tmp_path / "repo")


def _edit(ws: Path) -> None:
    (ws / "pkg" / "mod.py").write_text("def f():\n    return 2\n")
    (ws / "new.txt").write_text("added by the agent\n")
    (ws / "private.txt").chmod(0o640)


def test_round_trip_is_exact(root: DataRoot, repo: Path, tmp_path: Path) -> None:
    folder = assignment(root, repo, trial="t1", index=0)
    _edit(folder / "workspace")
    c = ck.create(root, folder)
    base = root.root / "checkpoints" / "p1"
    assert (base / "metadata" / f"{c.id}.json").is_file()
    assert (base / "file-manifests" / f"{c.id}.json").is_file()
    archive = base / "archives" / f"{c.id}.tar.lz4"
    assert archive.read_bytes()[:4] == b"\x04\x22\x4d\x18"  # the LZ4 frame magic
    assert (c.task, c.agent, c.model, c.status, c.parent) == (
        "fix-f",
        "builtin",
        "tiny",
        "resolved",
        None,
    )
    assert c.baseline and len(c.baseline) == 40

    out = tmp_path / "restored"
    ck.restore(root, c.id, out)
    src = folder / "workspace"
    for path in sorted(src.rglob("*")):
        twin = out / path.relative_to(src)
        st, st2 = path.lstat(), twin.lstat()
        assert st.st_mode == st2.st_mode, path
        if path.is_symlink():
            assert os.readlink(twin) == os.readlink(path)
        elif path.is_file():
            assert twin.read_bytes() == path.read_bytes(), path
    assert ck.manifest(out) == ck.manifest(src)
    # The restored workspace is still the git repo: its patch is the agent's edit.
    diff = subprocess.run(["git", "status", "--porcelain"], cwd=out, capture_output=True, text=True)
    assert "new.txt" in diff.stdout and "pkg/mod.py" in diff.stdout


def test_same_state_same_checkpoint_and_restore_refuses_a_full_folder(
    root: DataRoot, repo: Path, tmp_path: Path
) -> None:
    folder = assignment(root, repo, trial="t1", index=0)
    first = ck.create(root, folder)
    assert ck.create(root, folder) == first
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    with pytest.raises(ck.CheckpointError, match="not an empty folder"):
        ck.restore(root, first.id, full)
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        ck.restore(root, "nope", tmp_path / "n")


def test_status_and_labels_come_from_the_typed_files(root: DataRoot, repo: Path) -> None:
    """report.json is read as SwebenchReport and spec.json as SpecLabels: a report from before
    tampering was recorded still reads, a spec without labels falls back to the folder, and a
    report that is not one is refused, naming the file and the field."""
    folder = assignment(root, repo, trial="t1", index=0)
    report = json.loads((folder / "report.json").read_text())
    old = {k: v for k, v in report.items() if k not in ("tests_tampered", "tampered_files")}
    (folder / "report.json").write_text(json.dumps({**old, "status": "partial"}))
    (folder / "spec.json").write_text(json.dumps({"agent": "builtin"}))
    c = ck.create(root, folder)
    assert (c.project, c.trial, c.assignment, c.task, c.status) == (
        "p1",
        "t1",
        "t1-000",
        "",
        "partial",
    )

    _edit(folder / "workspace")
    (folder / "report.json").write_text(json.dumps({"status": "resolved"}))
    with pytest.raises(ck.CheckpointError, match=r"report.json: not a SwebenchReport: instance_id"):
        ck.create(root, folder)
    (folder / "report.json").unlink()
    assert ck.create(root, folder).status == "running"  # no report, no result yet


def test_restore_refuses_an_archive_that_escapes(
    root: DataRoot, repo: Path, tmp_path: Path
) -> None:
    import io
    import tarfile

    c = ck.create(root, assignment(root, repo, trial="t1", index=0))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("../outside.txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    archive = root.root / "checkpoints" / "p1" / "archives" / f"{c.id}.tar.lz4"
    archive.write_bytes(lz4.frame.compress(buf.getvalue()))
    with pytest.raises(ck.CheckpointError, match="escapes"):
        ck.restore(root, c.id, tmp_path / "out" / "ws")
    assert not (tmp_path / "out" / "outside.txt").exists()


def test_parents_form_an_evolution_tree(
    root: DataRoot, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = assignment(root, repo, trial="t1", index=0)
    c1 = ck.create(root, a)
    other = ck.create(root, assignment(root, repo, trial="t1", index=1, agent="aider"))
    b = assignment(root, repo, trial="t2", index=0)
    _edit(b / "workspace")
    c2 = ck.create(root, b)
    (b / "workspace" / "more.txt").write_text("later\n")
    c3 = ck.create(root, b)
    assert (other.parent, c2.parent, c3.parent) == (None, c1.id, c2.id)

    roots = ck.evolution(root, "t2")
    assert list(roots) == [("fix-f", c1.baseline)]
    [node] = roots[("fix-f", c1.baseline)]
    assert node.checkpoint.id == c1.id  # an ancestor from trial t1
    assert node.children[0].checkpoint.id == c2.id
    assert node.children[0].children[0].checkpoint.id == c3.id

    monkeypatch.setenv("AUTOVIBE_DATA", str(root.root))
    result = CliRunner().invoke(app, ["tree", "t2"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "trial t2"
    assert "task fix-f · baseline" in lines[1]
    order = [next(i for i, line in enumerate(lines) if c.id in line) for c in (c1, c2, c3)]
    assert order == sorted(order)
    assert other.id not in result.output
    missing = CliRunner().invoke(app, ["tree", "t9"])
    assert missing.exit_code == 1 and "no checkpoints of trial 't9'" in missing.output


def test_cli_create_and_restore(root: DataRoot, repo: Path, tmp_path: Path) -> None:
    folder = assignment(root, repo, trial="t1", index=0)
    env = {"AUTOVIBE_DATA": str(root.root)}
    made = CliRunner().invoke(app, ["create", str(folder)], env=env)
    assert made.exit_code == 0, made.output
    [meta] = (root.root / "checkpoints" / "p1" / "metadata").glob("*.json")
    cid = json.loads(meta.read_text())["id"]
    assert f"checkpoint {cid}" in made.output and "← baseline" in made.output
    done = CliRunner().invoke(app, ["restore", cid, str(tmp_path / "ws")], env=env)
    assert done.exit_code == 0, done.output
    assert (tmp_path / "ws" / "run.sh").stat().st_mode & 0o777 == 0o755
    bad = CliRunner().invoke(app, ["create", str(tmp_path)], env=env)
    assert bad.exit_code == 1 and "does not exist" in bad.output


def _qemu_io(image: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(image)], capture_output=True, text=True
    )


@pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img missing: apt-get install qemu-utils"
)
def test_vm_snapshots_on_a_qcow2(root: DataRoot, tmp_path: Path) -> None:
    image = tmp_path / "worker.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", str(image), "4M"], check=True, capture_output=True
    )
    assert _qemu_io(image, "write -P 0xab 0 64k").returncode == 0
    record = ck.vm_snapshot(root, "p1", image, "t1-000-before")
    assert (
        json.loads((root.root / "checkpoints/p1/vm-snapshots/t1-000-before.json").read_text())
        == record
    )
    assert _qemu_io(image, "write -P 0xcd 0 64k").returncode == 0
    assert ck.vm_snapshots(image) == ["t1-000-before"]
    listed = subprocess.run(
        ["qemu-img", "snapshot", "-l", str(image)], capture_output=True, text=True
    )
    assert "t1-000-before" in listed.stdout

    ck.vm_revert(image, "t1-000-before")
    check = _qemu_io(image, "read -P 0xab 0 64k")
    assert check.returncode == 0 and "Pattern verification failed" not in check.stdout
    with pytest.raises(ck.CheckpointError, match="no snapshot 'nope'"):
        ck.vm_revert(image, "nope")
    runner = CliRunner()
    out = runner.invoke(app, ["vm-list", str(image)])
    assert out.exit_code == 0 and out.output.split() == ["t1-000-before"]

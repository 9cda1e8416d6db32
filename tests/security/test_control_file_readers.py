"""Every reader of an assignment's folder treats it as untrusted (issue 17, finding 5).

Under Nomad or VMs the assignment folders of the shared data root are written by the workers,
and the workspace's `.git` is always the agent's. The operator's view (`workers.operator`) and
the checkpoints (`retention.checkpoints`) must not follow a link planted for spec.json,
report.json, result.json or the dispatch record, must bound what they read, must never take
the agent's `.git` for the baseline, and must quote what they show to be pasted in a shell.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from contracts.dataroot import DataRoot
from retention import checkpoints as ck
from tests.ops.ops_harness import assignment, task_repo
from tests.security.spec_harness import plain_spec
from workers import operator
from workers.nomad import RECORD
from workers.workspace import default_baseline, isolated_git


def worker(root: DataRoot, repo: Path, index: int, prompt: str = "Implement f.") -> Path:
    """An assignment folder with the whole spec.json a driver writes."""
    folder = assignment(root, repo, trial="t1", index=index)
    spec = plain_spec(folder.name, folder, repo, prompt=prompt)
    (folder / "spec.json").write_text(spec.model_dump_json())
    return folder


@pytest.fixture
def root(tmp_path: Path) -> DataRoot:
    return DataRoot.at(tmp_path / "data")


@pytest.mark.parametrize("name", ["report.json", "result.json", "spec.json"])
def test_a_checkpoint_never_reads_a_linked_control_file(
    root: DataRoot, tmp_path: Path, name: str
) -> None:
    repo = task_repo(tmp_path / "repo")
    mine = assignment(root, repo, trial="t1", index=0)
    other = assignment(root, repo, trial="t1", index=1)
    if name == "result.json":
        (mine / "report.json").unlink()  # the status then comes from the result
        (other / "result.json").write_text(json.dumps({"assignment": "t1-001"}))
    (mine / name).unlink(missing_ok=True)
    os.symlink(other / name, mine / name)
    with pytest.raises(ck.CheckpointError, match=f"{name}: not read"):
        ck.create(root, mine)
    assert not (root.root / "checkpoints").exists()


def test_the_baseline_is_the_hosts_not_the_agents_git(root: DataRoot, tmp_path: Path) -> None:
    folder = assignment(root, task_repo(tmp_path / "repo"), trial="t1", index=0)
    ws = folder / "workspace"
    host = isolated_git(default_baseline(ws), "rev-parse", "HEAD").decode().strip()
    # The agent makes its own history: another root commit at HEAD, as if the task began there.
    env = {**os.environ, "GIT_AUTHOR_NAME": "a", "GIT_AUTHOR_EMAIL": "a@b"}
    env |= {"GIT_COMMITTER_NAME": "a", "GIT_COMMITTER_EMAIL": "a@b"}
    for args in (["checkout", "-q", "--orphan", "forged"], ["commit", "-q", "-m", "forged root"]):
        subprocess.run(["git", *args], cwd=ws, env=env, check=True)
    made = ck.create(root, folder)
    assert made.baseline == host


def test_the_operator_refuses_a_linked_or_oversized_spec(root: DataRoot, tmp_path: Path) -> None:
    repo = task_repo(tmp_path / "repo")
    mine, other = worker(root, repo, 0), worker(root, repo, 1)
    (mine / "spec.json").unlink()
    os.symlink(other / "spec.json", mine / "spec.json")
    with pytest.raises(OSError):
        operator.inspect(mine)
    big = worker(root, repo, 2, prompt="x" * (5 << 20))
    with pytest.raises(ValueError):
        operator.inspect(big)
    # Neither is listed as a worker (nor as t1-001, which the link pointed at, twice).
    assert [w.assignment for w in operator.workers(root, everything=True)] == ["t1-001"]


def test_a_forged_nomad_job_is_shown_quoted(root: DataRoot, tmp_path: Path) -> None:
    folder = worker(root, task_repo(tmp_path / "repo"), 0)
    job = "x; touch /tmp/pwned"
    (folder / RECORD).write_text(json.dumps([{"token": "t", "job": job, "at": 0}]))
    shown = operator.nomad_access(None, None, operator.nomad_job(operator.inspect(folder)))
    assert "nomad job allocs 'x; touch /tmp/pwned'" in shown[0]

"""A generated data root with a real assignment workspace, state DB, ledger and secrets."""

from __future__ import annotations

import datetime as dt
import json
import os
from decimal import Decimal
from pathlib import Path

from contracts.dataroot import DataRoot, write_secret_file
from ledger.book import Ledger
from workers import workspace
from workers.grading import GradeReport, swebench_report

FX = {"USD": Decimal("1"), "CAD": Decimal("1.37")}


def task_repo(path: Path) -> Path:
    """A small repo with odd modes, links (relative, absolute, dangling) and binary bytes."""
    (path / "pkg" / "deep").mkdir(parents=True)
    (path / "empty").mkdir()
    (path / "pkg" / "mod.py").write_text("def f():\n    return 1\n")
    (path / "pkg" / "deep" / "data.bin").write_bytes(bytes(range(256)) * 40)
    run = path / "run.sh"
    run.write_text("#!/bin/sh\necho hi\n")
    run.chmod(0o755)
    private = path / "private.txt"
    private.write_text("only me\n")
    private.chmod(0o600)
    readonly = path / "pkg" / "frozen.txt"
    readonly.write_text("frozen\n")
    readonly.chmod(0o444)
    (path / "pkg" / "deep").chmod(0o700)
    os.symlink("pkg/mod.py", path / "link-to-mod")
    os.symlink("/etc/hostname", path / "absolute-link")
    os.symlink("does/not/exist", path / "dangling")
    return path


def assignment(
    root: DataRoot,
    repo: Path,
    *,
    trial: str,
    index: int,
    task: str = "fix-f",
    agent: str = "builtin",
) -> Path:
    """worker-artifacts/<project>/<trial>/<assignment>/ with spec, report and a git workspace."""
    aid = f"{trial}-{index:03d}"
    folder = root.assignment_dir("p1", trial, aid)
    folder.mkdir(parents=True)
    spec = {"assignment": aid, "project": "p1", "trial": trial, "task_id": task}
    spec |= {"agent": agent, "model": "tiny"}
    (folder / "spec.json").write_text(json.dumps(spec))
    grade = GradeReport("resolved", {"tests/test_f.py::test_f": "PASSED"}, {}, 0, False, Path())
    report = swebench_report(task, aid, grade, patch_exists=True)
    (folder / "report.json").write_text(json.dumps(report.to_json()))
    workspace.prepare(repo, folder / "workspace")
    return folder


def ledger(root: DataRoot, project: str = "p1") -> Ledger:
    root.financial(project).mkdir(parents=True, exist_ok=True)
    book = Ledger.of(root, project)
    book.open(project, Decimal("50"), "CAD", FX, dt.date(2026, 1, 5))
    return book


def secrets(root: DataRoot) -> None:
    write_secret_file(root.secrets / "store.key", "k" * 44)
    write_secret_file(root.secrets / "operator-token", "tok")
    ca = root.proxy_confdir
    ca.mkdir(parents=True)
    write_secret_file(ca / "mitmproxy-ca.pem", "-----BEGIN PRIVATE KEY-----\n")
    (ca / "mitmproxy-ca-cert.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    (root.configs).mkdir(parents=True)
    (root.configs / "logrotate.conf").write_text("# rendered\n")

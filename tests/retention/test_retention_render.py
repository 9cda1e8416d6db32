"""Rendered logrotate, cron (tmpreaper), systemd and ILM files carry the policy's numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from contracts.dataroot import DataRoot
from retention import render
from retention.cli import app
from retention.policy import RetentionPolicy, load_policy

CUSTOM = """\
directories:
  traffic-logs: {keep_days: 45, expire_by: day-folder}
  worker-artifacts: {keep_days: 120, expire_by: last-modified}
  financial: {keep_days: 2557, never_delete: true}
  checkpoints: {keep_days: null}
protected: ["*.lock", "*.pid"]
service_logs: {paths: ["run/*.log"], keep_days: 21}
index_fields: {bodies: 7, headers: 60, usage: null}
"""
EXECUTABLE = Path(sys.executable).with_name("autovibe")


@pytest.fixture
def custom(tmp_path: Path) -> tuple[Path, RetentionPolicy]:
    path = tmp_path / "retention-policies.yaml"
    path.write_text(CUSTOM)
    return path, load_policy(path)


def _render(tmp_path: Path, path: Path, policy: RetentionPolicy) -> dict[str, str]:
    root = DataRoot.at(tmp_path / "data")
    written = render.render(policy, root, tmp_path / "out", EXECUTABLE, path)
    return {p.relative_to(tmp_path / "out").as_posix(): p.read_text() for p in written}


def test_rendered_files_carry_the_policy_numbers(
    tmp_path: Path, custom: tuple[Path, RetentionPolicy]
) -> None:
    files = _render(tmp_path, *custom)
    data = (tmp_path / "data").resolve()
    cron = files["autovibe-retention.cron"].splitlines()
    jobs = [line for line in cron if line and not line.startswith(("#", "SHELL"))]
    protect = "--protect '*.lock' --protect '*.pid'"
    assert jobs == [
        f"17 3 * * * root tmpreaper --mtime --mtime-dir {protect} 45d {data}/traffic-logs",
        f"17 3 * * * root tmpreaper --mtime --mtime-dir {protect} 120d {data}/worker-artifacts",
    ]
    assert "financial" not in files["autovibe-retention.cron"]
    logrotate = files["logrotate.conf"]
    assert f"{data}/run/*.log {{" in logrotate
    assert "    rotate 21\n" in logrotate and "    maxage 21\n" in logrotate
    service = files["autovibe-retention.service"]
    assert f"ExecStart={EXECUTABLE} retention apply --policy {custom[0]}\n" in service
    assert f"Environment=AUTOVIBE_DATA={data}\n" in service
    assert f"ReadWritePaths={data}\n" in service
    assert "OnCalendar=*-*-* 03:17:00\n" in files["autovibe-retention.timer"]
    ilm = {name: json.loads(text) for name, text in files.items() if name.startswith("ilm/")}
    phases = {name: body["policy"]["phases"] for name, body in ilm.items()}
    assert phases["ilm/autovibe-traffic-bodies.json"]["delete"]["min_age"] == "7d"
    assert phases["ilm/autovibe-traffic-headers.json"]["delete"]["min_age"] == "60d"
    assert "delete" not in phases["ilm/autovibe-traffic-usage.json"]  # usage: forever


def test_shipped_policy_renders_the_documented_limits(
    tmp_path: Path, policy: RetentionPolicy
) -> None:
    files = _render(tmp_path, Path("/etc/autovibe/retention-policies.yaml"), policy)
    assert " 30d " in files["autovibe-retention.cron"]
    assert " 90d " in files["autovibe-retention.cron"]
    assert '"min_age": "14d"' in files["ilm/autovibe-traffic-bodies.json"]


def test_paths_that_units_cannot_hold_are_refused(tmp_path: Path, policy: RetentionPolicy) -> None:
    root = DataRoot.at(tmp_path / "data root")
    with pytest.raises(ValueError, match="must be an absolute path"):
        render.render(policy, root, tmp_path / "out", EXECUTABLE, Path("/p.yaml"))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_units_verify(tmp_path: Path, custom: tuple[Path, RetentionPolicy]) -> None:
    assert EXECUTABLE.exists(), "ExecStart must name an existing program for verify"
    _render(tmp_path, *custom)
    out = tmp_path / "out"
    proc = subprocess.run(
        ["systemd-analyze", "verify", render.SERVICE, render.TIMER],
        cwd=out,
        capture_output=True,
        text=True,
        timeout=60,
    )
    own = [line for line in proc.stderr.splitlines() if "autovibe-retention" in line]
    assert proc.returncode == 0 and not own, proc.stderr


def test_cli_render_writes_every_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["render", str(tmp_path / "out")], env={"AUTOVIBE_DATA": str(tmp_path / "data")}
    )
    assert result.exit_code == 0, result.output
    names = sorted(
        p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.*")
    )
    assert names == [
        render.CRON,
        render.SERVICE,
        render.TIMER,
        "ilm/autovibe-traffic-bodies.json",
        "ilm/autovibe-traffic-headers.json",
        "ilm/autovibe-traffic-usage.json",
        render.LOGROTATE,
    ]

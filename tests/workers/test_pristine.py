"""workers.pristine on a real prepared workspace: what counts as tampering with the tests."""

from __future__ import annotations

from pathlib import Path

from worker_harness import EXAMPLES

from workers.pristine import restore
from workers.workspace import default_baseline, prepare

TESTS = ["tests/test_basic.py::test_add"]


def prepared(tmp_path: Path) -> Path:
    workspace = tmp_path / "workspace"
    prepare(EXAMPLES / "mathkit", workspace)
    return workspace


def test_bytecode_from_running_the_tests_is_removed_but_not_tampering(tmp_path: Path) -> None:
    """An agent that runs pytest leaves tests/__pycache__: removed, never flagged (every
    builtin-agent run of `make demo` was flagged before)."""
    workspace = prepared(tmp_path)
    cache = workspace / "tests" / "__pycache__"
    cache.mkdir()
    (cache / "test_basic.cpython-311-pytest-9.2.0.pyc").write_bytes(b"\x00bytecode")
    tampering = restore(workspace, default_baseline(workspace), TESTS)
    assert tampering.files == []
    assert not cache.exists()


def test_a_sourceless_module_at_the_root_is_still_flagged(tmp_path: Path) -> None:
    """`pytest.pyc` beside the tests is imported in place of pytest: hostile, and flagged."""
    workspace = prepared(tmp_path)
    (workspace / "pytest.pyc").write_bytes(b"\x00bytecode")
    (workspace / "tests" / "test_basic.py").write_text("def test_add():\n    pass\n")
    tampering = restore(workspace, default_baseline(workspace), TESTS)
    assert tampering.files == ["pytest.pyc", "tests/test_basic.py"]
    assert not (workspace / "pytest.pyc").exists()
    assert "def test_add():\n    pass" not in (workspace / "tests" / "test_basic.py").read_text()


def test_a_folder_made_a_rootdir_by_the_agent_is_undone(tmp_path: Path) -> None:
    """A pyproject.toml (even without a pytest table) or a setup.py below the root can become
    pytest's rootdir, which the test ids are relative to: removed and flagged. The same file
    at the root, where the rootdir is anyway, is the agent's to add."""
    workspace = prepared(tmp_path)
    (workspace / "mathkit" / "pyproject.toml").write_text('[project]\nname = "sub"\n')
    (workspace / "mathkit" / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    (workspace / "pyproject.toml").write_text(
        (workspace / "pyproject.toml").read_text() + "\n[tool.ruff]\nline-length = 99\n"
    )
    (workspace / "setup.py").write_text("from setuptools import setup\nsetup()\n")
    (workspace / "setup.cfg").write_text("[metadata]\nname = mathkit\n")
    tampering = restore(workspace, default_baseline(workspace), TESTS)
    assert tampering.files == ["mathkit/pyproject.toml", "mathkit/setup.py"]
    assert not (workspace / "mathkit" / "pyproject.toml").exists()
    assert not (workspace / "mathkit" / "setup.py").exists()
    assert (workspace / "setup.py").exists() and (workspace / "setup.cfg").exists()
    assert "line-length = 99" in (workspace / "pyproject.toml").read_text()

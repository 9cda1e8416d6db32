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

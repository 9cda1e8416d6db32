"""Setup environments: a SWE-bench-format instance whose `install` step builds part of the
project (generated code its tests import) is imported, and validated by the real runner in
bubblewrap: the step runs once, offline, over the repository at its base commit, and both
the oracle's and the empty agent's runs start from the tree it left. The same instance
without the step, or with a step that needs the network, is invalid, and says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from git_servers import instance_from_history

from contracts.config import ConfigError
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator.taskimport import import_swebench
from orchestrator.taskvalidate import validate
from workers.sandbox import require_tools

BUILD = (
    "from pathlib import Path\n\n"
    "squares = [n * n for n in range(100)]\n"
    "Path('fastmath/_table.py').write_text(f'SQUARES = {squares!r}\\n')\n"
)
INIT = (
    "from ._table import SQUARES\n\n\n"
    "def square(n):\n    return SQUARES[n]\n\n\n"
    "def cube(n):\n    return SQUARES[n] + n\n"
)
TESTS = "from fastmath import cube, square\n\n\ndef test_square():\n    assert square(7) == 49\n"
FETCHES = "python -c \"import urllib.request; urllib.request.urlopen('https://pypi.org/simple/')\""


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """`acme/fastmath`: `python build.py` generates the table its module imports; cube() is
    wrong, and its fix and test come from the repository's history."""
    instance = instance_from_history(
        tmp_path / "repos" / "acme__fastmath",
        {
            "build.py": BUILD,
            "fastmath/__init__.py": INIT,
            "tests/test_fastmath.py": TESTS,
            ".gitignore": "fastmath/_table.py\n",
        },
        {
            "fastmath/__init__.py": INIT.replace("SQUARES[n] + n", "SQUARES[n] * n"),
            "tests/test_fastmath.py": TESTS + "\n\ndef test_cube():\n    assert cube(3) == 27\n",
        },
        "fastmath",
        instance_id="acme__fastmath-1",
        repo="acme/fastmath",
        problem_statement="cube() is wrong.",
        FAIL_TO_PASS=["tests/test_fastmath.py::test_cube"],
        PASS_TO_PASS=["tests/test_fastmath.py::test_square"],
        version="1.0",
        install="python build.py",
    )
    instances = [
        instance,
        {**instance, "instance_id": "acme__fastmath-2", "install": None},
        {**instance, "instance_id": "acme__fastmath-3", "pre_install": FETCHES},
    ]
    path = tmp_path / "fastmath.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in instances))
    return path


@pytest.mark.slow  # six sandboxed runs of the real runner and two setups: ~20 s
def test_the_install_step_runs_once_and_every_run_starts_from_its_tree(
    dataset: Path, tmp_path: Path
) -> None:
    require_tools()
    settings = Settings(data=tmp_path / "data", task_roots=[tmp_path], host="127.0.0.1")
    root = DataRoot.at(settings.data)
    taskset = import_swebench(dataset, root, repos=tmp_path / "repos")
    setups = [e.task.environment.setup if e.task.environment else [] for e in taskset.entries]
    assert setups == [["python build.py"], [], [FETCHES, "python build.py"]]
    validation = validate("fastmath", settings)
    verdicts = {v.task: (v.valid, v.oracle, v.empty) for v in validation.verdicts}
    assert verdicts["acme__fastmath-1"] == (True, "resolved", "unresolved"), validation
    # Without its install step the module cannot be imported: the gold patch resolves nothing.
    assert verdicts["acme__fastmath-2"] == (False, "unresolved", "unresolved")
    # A step that needs the network fails offline: the task is invalid, not a trial's failure.
    why = validation.invalid()["acme__fastmath-3"]
    assert "infrastructure error" in why and "its setup commands failed (exit 1" in why, why
    assert "urlopen" in why, why
    # One setup made (and its failure logged), shared by the oracle's and the empty runs.
    environments = tmp_path / "data" / "environments"
    (manifest,) = environments.glob("setup-*/manifest.json")
    made = json.loads(manifest.read_text())
    assert made["setup"] == ["python build.py"] and made["build_s"] >= 0
    assert "+ python build.py" in (manifest.parent / "build.log").read_text()
    assert len(list(environments.glob("setup-*.failed.log"))) == 1
    runs = tmp_path / "data" / "worker-artifacts" / "_validation" / "fastmath"
    for agent in ("oracle", "empty"):
        result = json.loads((runs / f"acme__fastmath-1.{agent}" / "result.json").read_text())
        assert "environment" in result["phases"], result
    # The generated table is in the baseline, not in the agent's patch.
    oracle = runs / "acme__fastmath-1.oracle"
    assert (oracle / "workspace" / "fastmath" / "_table.py").exists()
    assert "_table.py" not in (oracle / "patch.diff").read_text()


def test_install_steps_must_be_commands(dataset: Path, tmp_path: Path) -> None:
    good = json.loads(dataset.read_text().splitlines()[0])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good | {"install": [1, "make"]}) + "\n")
    root = DataRoot.at(tmp_path / "data")
    with pytest.raises(ConfigError) as caught:
        import_swebench(bad, root, repos=tmp_path / "repos")
    (problem,) = caught.value.problems
    assert problem.startswith("line 1: acme__fastmath-1: install: a shell command or a list"), (
        problem
    )
    assert not (tmp_path / "data" / "tasks" / "bad").exists()

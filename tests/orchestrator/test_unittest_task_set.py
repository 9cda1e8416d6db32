"""A SWE-bench-format set whose repository is not tested with pytest: a small Django-style
project (`tests/runtests.py`, unittest's verbose runner, as Django's own) named `django/django`,
so that its instances are graded the way SWE-bench grades Django's: the `swebench` package's
parser for that repository (`parse_log_django`) reads the `test_x (module.Class.test_x) ... ok`
lines. Imported offline from `--repos`, its `patch` and `test_patch` from the repository's
history, and validated by the real runner in bubblewrap: the oracle resolves it with the
test_patch applied, the empty agent does not.
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

RUNTESTS = (
    "import sys\nimport unittest\n\n"
    "sys.path.insert(0, '.')  # the project, as Django's runtests.py puts it first\n"
    "suite = unittest.defaultTestLoader.discover('tests', top_level_dir='tests')\n"
    "result = unittest.TextTestRunner(verbosity=2).run(suite)\n"
    "sys.exit(not result.wasSuccessful())\n"
)
UTILS = "def slugify(text):\n    return text.lower()\n"
TESTS = (
    "import unittest\n\nfrom utils import slugify\n\n\n"
    "class SlugifyTests(unittest.TestCase):\n"
    "    def test_lower(self):\n        self.assertEqual(slugify('AB'), 'ab')\n"
)
SPACES = "\n    def test_spaces(self):\n        self.assertEqual(slugify('a b'), 'a-b')\n"
F2P = "test_spaces (test_utils.SlugifyTests.test_spaces)"
P2P = "test_lower (test_utils.SlugifyTests.test_lower)"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    instance = instance_from_history(
        tmp_path / "repos" / "django__django",
        {"utils.py": UTILS, "tests/runtests.py": RUNTESTS, "tests/test_utils.py": TESTS},
        {
            "utils.py": UTILS.replace("text.lower()", "text.lower().replace(' ', '-')"),
            "tests/test_utils.py": TESTS + SPACES,
        },
        "utils.py",
        instance_id="django__django-1",
        repo="django/django",
        problem_statement="slugify() keeps spaces.",
        FAIL_TO_PASS=json.dumps([F2P]),
        PASS_TO_PASS=json.dumps([P2P]),
        version="5.0",
        test_cmd="python tests/runtests.py",
    )
    path = tmp_path / "djangoish.jsonl"
    path.write_text(json.dumps(instance) + "\n")
    return path


@pytest.mark.slow  # two sandboxed runs of the real runner: ~8 s
def test_a_django_style_instance_is_graded_by_swebenchs_parser_for_django(
    dataset: Path, tmp_path: Path
) -> None:
    require_tools()
    settings = Settings(data=tmp_path / "data", task_roots=[tmp_path], host="127.0.0.1")
    taskset = import_swebench(dataset, DataRoot.at(settings.data), repos=tmp_path / "repos")
    (entry,) = taskset.entries
    assert entry.task.parser == "django/django" and entry.task.environment is None
    validation = validate("djangoish", settings)
    (verdict,) = validation.verdicts
    assert (verdict.valid, verdict.oracle, verdict.empty) == (True, "resolved", "unresolved"), (
        verdict
    )
    runs = tmp_path / "data" / "worker-artifacts" / "_validation" / "djangoish"
    empty = json.loads((runs / "django__django-1.empty" / "report.json").read_text())
    # The test_patch's new test ran and failed; the old one passed: read from unittest's lines.
    assert empty["tests_status"]["FAIL_TO_PASS"] == {"success": [], "failure": [F2P]}
    assert empty["tests_status"]["PASS_TO_PASS"] == {"success": [P2P], "failure": []}
    log = (runs / "django__django-1.empty" / "tests.log").read_text()
    assert f"{F2P} ... FAIL" in log and "short test summary" not in log
    oracle = json.loads((runs / "django__django-1.oracle" / "report.json").read_text())
    assert oracle["tests_status"]["FAIL_TO_PASS"]["success"] == [F2P]


def eval_script(test_command: str) -> str:
    """An eval.sh as SWE-bench 5 ships it with an instance: its test command between the
    harness's markers, among what only its Docker image needs."""
    return (
        "#!/bin/bash\nset -uxo pipefail\nsource /opt/miniconda3/bin/activate\n"
        "conda activate testbed\ncd /testbed\ngit apply -v - <<'EOF_114329324912'\n"
        "(the test_patch)\nEOF_114329324912\n: '>>>>> Start Test Output'\n"
        f"{test_command}\n: '>>>>> End Test Output'\ngit checkout base tests/test_utils.py\n"
    )


def test_the_test_command_comes_from_test_cmd_or_the_eval_script_or_is_asked_for(
    dataset: Path, tmp_path: Path
) -> None:
    """swebench 5 has no test command by repository: an instance's own `test_cmd`, else the
    one between its `eval_script`'s markers; a Django instance with neither is refused, since
    the default pytest run could not be read by Django's parser."""
    instance = json.loads(dataset.read_text())
    del instance["test_cmd"]
    scripted = instance | {
        "instance_id": "django__django-2",
        "eval_script": eval_script("python tests/runtests.py --verbosity 2"),
        "log_parser": "parse_log_django",
    }
    path = tmp_path / "scripted.jsonl"
    path.write_text(json.dumps(scripted) + "\n")
    root = DataRoot.at(tmp_path / "data")
    (entry,) = import_swebench(path, root, repos=tmp_path / "repos").entries
    assert entry.task.test_command == "python tests/runtests.py --verbosity 2"
    assert entry.task.parser == "parse_log_django"
    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps(instance) + "\n")
    with pytest.raises(ConfigError) as caught:
        import_swebench(bare, root, repos=tmp_path / "repos")
    (problem,) = caught.value.problems
    assert problem.startswith("line 1: django__django-1: test_cmd: none given, and no eval_script")
    assert "parser for django/django is not pytest's" in problem, problem
    # An eval_script without the markers is named; a test command given for the set is used.
    unmarked = instance | {"eval_script": "#!/bin/bash\n./tests/runtests.py\n"}
    bare.write_text(json.dumps(unmarked) + "\n")
    with pytest.raises(ConfigError, match="eval_script: no test command between"):
        import_swebench(bare, root, repos=tmp_path / "repos")
    bare.write_text(json.dumps(instance) + "\n")
    given = import_swebench(
        bare, root, name="given", repos=tmp_path / "repos", test_command="python tests/runtests.py"
    )
    assert given.entries[0].task.test_command == "python tests/runtests.py"

"""Agents on a SWE-bench-format set (issue 21): a dataset made from two small real projects,
one tested with pytest (`acme/words`) and one with a Django-style unittest runner
(`django/django`, read by swebench's `parse_log_django`), each instance's `patch` and
`test_patch` from the project's history. Imported, validated (the oracle resolves each task,
the empty agent does not), then run by the built-in agent and mini-swe-agent in trials that
name the set: the real control API, the scheduler with detached runners, bubblewrap, the real
mitmdump metering every model call, grading with the `test_patch` applied and the task's
swebench parser.

The model is the deterministic server, scripted per project with one answer both agents can
use: an indented function body (what the built-in agent splices into the stub; it stops
reading where the indentation ends) followed by one `mswea_bash_command` block (what
mini-swe-agent runs: the same fix by `sed`, then its submit command). So each of the four runs
is known to resolve its task, and what is tested is the platform around it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from git_servers import git
from trial_runs import operator_api, run_all_to_the_end, trial_settings

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "workers"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from agents_harness import installed
from proxy_harness import running_proxy

from contracts.credentials import load_or_create_key
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator.platform import Platform
from orchestrator.state import Trial
from orchestrator.taskimport import import_swebench
from orchestrator.taskvalidate import validate
from proxy.launch import mitmdump_argv
from tests.serving.model_harness import deterministic_server
from workers.sandbox import require_tools

pytestmark = pytest.mark.slow  # four sandboxed validation runs and four trials: ~2 min

SET = "twoprojects"
AGENTS = ["builtin", "mini-swe-agent"]


@dataclass(frozen=True)
class Project:
    """A project of the set: its files at the base commit, the stub's fix and its new test."""

    repo: str
    source: str
    """The module holding the stub."""
    files: dict[str, str]
    body: str
    """The stub's fixed body (one line, no indentation)."""
    test_file: str
    new_test: str
    fail_to_pass: str
    pass_to_pass: str
    test_cmd: str | None

    @property
    def task_id(self) -> str:
        return f"{self.repo.replace('/', '__')}-1"

    def answer(self) -> str:
        """One scripted answer for both agents: the body, then mini-swe-agent's action."""
        sed = f'sed -i "s/raise NotImplementedError/{self.body}/" {self.source}'
        return (
            f"    {self.body}\n\n"
            f"```mswea_bash_command\n{sed} && echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT\n```\n"
        )


STUB = '    """{doc}"""\n    raise NotImplementedError\n'
WORDS = Project(
    repo="acme/words",
    source="words.py",
    files={
        "words.py": (
            "def whisper(text):\n    return text.lower()\n\n\n"
            "def shout(text):\n" + STUB.format(doc="TEXT in capitals, and '!'.")
        ),
        "tests/test_words.py": (
            "from words import shout, whisper  # noqa: F401\n\n\n"
            "def test_whisper():\n    assert whisper('Hi') == 'hi'\n"
        ),
    },
    body="return text.upper() + '!'",
    test_file="tests/test_words.py",
    new_test="\n\ndef test_shout():\n    assert shout('hi') == 'HI!'\n",
    fail_to_pass="tests/test_words.py::test_shout",
    pass_to_pass="tests/test_words.py::test_whisper",
    test_cmd=None,  # acme/words is unknown to swebench: pytest, its parser the fallback
)
DJANGOISH = Project(
    repo="django/django",
    source="utils.py",
    files={
        "utils.py": (
            "def lower(text):\n    return text.lower()\n\n\n"
            "def slugify(text):\n" + STUB.format(doc="text in lower case, words joined by '-'.")
        ),
        "tests/runtests.py": (
            "import sys\nimport unittest\n\n"
            "sys.path.insert(0, '.')  # the project, as Django's runtests.py puts it first\n"
            "suite = unittest.defaultTestLoader.discover('tests', top_level_dir='tests')\n"
            "result = unittest.TextTestRunner(verbosity=2).run(suite)\n"
            "sys.exit(not result.wasSuccessful())\n"
        ),
        "tests/test_utils.py": (
            "import unittest\n\nfrom utils import lower, slugify  # noqa: F401\n\n\n"
            "class UtilsTests(unittest.TestCase):\n"
            "    def test_lower(self):\n        self.assertEqual(lower('AB'), 'ab')\n"
        ),
    },
    body="return text.lower().replace(' ', '-')",
    test_file="tests/test_utils.py",
    new_test="\n    def test_slugify(self):\n        self.assertEqual(slugify('A b'), 'a-b')\n",
    fail_to_pass="test_slugify (test_utils.UtilsTests.test_slugify)",
    pass_to_pass="test_lower (test_utils.UtilsTests.test_lower)",
    test_cmd="python tests/runtests.py",
)
PROJECTS = [WORDS, DJANGOISH]


def instance(project: Project, repos: Path) -> dict[str, Any]:
    """The project's repository under `repos`, and its instance: the stub implemented and its
    test added in one commit, split into `patch` and `test_patch`."""
    work = repos / project.repo.replace("/", "__")
    (work / "tests").mkdir(parents=True)
    git(work, "init", "-q", "--initial-branch=main")
    for name, text in project.files.items():
        (work / name).write_text(text)
    git(work, "add", "-A")
    git(work, "commit", "-qm", "base")
    base = git(work, "rev-parse", "HEAD").strip()
    source = work / project.source
    source.write_text(source.read_text().replace("raise NotImplementedError", project.body))
    test_file = work / project.test_file
    test_file.write_text(test_file.read_text() + project.new_test)
    git(work, "commit", "-qam", "the fix and its test")
    fix = git(work, "rev-parse", "HEAD").strip()
    return {
        "instance_id": project.task_id,
        "repo": project.repo,
        "base_commit": base,
        "patch": git(work, "diff", base, fix, "--", project.source),
        "test_patch": git(work, "diff", base, fix, "--", "tests"),
        "problem_statement": f"Implement the stub in {project.source}.",
        "FAIL_TO_PASS": [project.fail_to_pass],
        "PASS_TO_PASS": [project.pass_to_pass],
        "version": "1.0",
        **({"test_cmd": project.test_cmd} if project.test_cmd else {}),
    }


@dataclass(frozen=True)
class Runs:
    settings: Settings
    validated: dict[str, tuple[bool, str, str]]
    ended: dict[tuple[str, str], tuple[str, str | None]]
    """(task, agent) -> (state, status) of each trial assignment."""
    trials: dict[str, dict[str, str]]
    """task -> agent -> the id of the trial in which the agent ran the task."""


def trial(project: Project, agent: str) -> dict[str, Any]:
    return {
        "name": f"{agent}-on-{project.task_id}",
        "project": "sets",
        "budget": {"amount": "5", "currency": "CAD", "period": "monthly"},
        "machines": {"count": 1, "daily_allowance": "2"},
        "agents": [agent],
        "model_pairs": ["tiny"],
        "confidence": {"enabled": False},
        "tasks": {"set": SET, "ids": [project.task_id]},
    }


def run_trials(
    client: TestClient, platform: Platform, settings: Settings, project: Project
) -> dict[str, str]:
    """The project's task run by each agent, in a trial of its own, against the model
    scripted for the project: agent -> trial id."""
    log = settings.data / f"model-{project.task_id}.log"
    with deterministic_server(settings, [project.answer()], log=log):
        trials = {}
        for agent in AGENTS:
            resp = client.post("/v1/trials", json=trial(project, agent))
            assert resp.status_code == 201, resp.text
            trials[agent] = resp.json()["id"]
        for trial_id in trials.values():  # each scheduler's tick starts and ends both
            run_all_to_the_end(platform, trial_id, timeout_s=300)
    return trials


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    require_tools()
    base = tmp_path_factory.mktemp("set-agents")
    dataset = base / f"{SET}.jsonl"
    dataset.write_text("".join(json.dumps(instance(p, base / "repos")) + "\n" for p in PROJECTS))
    settings = trial_settings(base, sandboxed=True)
    root = DataRoot.at(settings.data)
    DataRoot.ensure(root.root)
    import_swebench(dataset, root, repos=base / "repos", context={"task_roots": [base]})
    validation = validate(SET, settings)
    validated = {v.task: (v.valid, v.oracle, v.empty) for v in validation.verdicts}
    installed("mini-swe-agent", root.root)
    ended: dict[tuple[str, str], tuple[str, str | None]] = {}
    trials = {}
    with (
        running_proxy(settings, root, load_or_create_key(root), mitmdump_argv(settings)),
        operator_api(settings) as (client, platform),
    ):
        for project in PROJECTS:
            trials[project.task_id] = run_trials(client, platform, settings, project)
        with platform.store.session() as s:
            for trial_id in (t for by_agent in trials.values() for t in by_agent.values()):
                for a in s.get_one(Trial, trial_id).assignments:
                    ended[(a.task_id, a.agent)] = (a.state, a.status)
    yield Runs(settings, validated, ended, trials)


def test_the_set_is_valid_and_both_agents_resolve_both_projects(runs: Runs) -> None:
    assert runs.validated == {p.task_id: (True, "resolved", "unresolved") for p in PROJECTS}, (
        runs.validated
    )
    assert runs.ended == {
        (p.task_id, agent): ("finished", "resolved") for p in PROJECTS for agent in AGENTS
    }, runs.ended


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.repo)
def test_each_run_was_graded_with_the_test_patch_and_the_tasks_parser(
    runs: Runs, project: Project
) -> None:
    folders = [
        runs.settings.data / "worker-artifacts" / "sets" / trial_id
        for trial_id in runs.trials[project.task_id].values()
    ]
    reports = {}
    for spec_path in (path for folder in folders for path in folder.glob("*/spec.json")):
        spec = json.loads(spec_path.read_text())
        artifacts = spec_path.parent
        reports[spec["agent"]] = json.loads((artifacts / "report.json").read_text())
        # The agent's patch is its fix alone; the new test came from the test_patch.
        patch = (artifacts / "patch.diff").read_text()
        assert project.source in patch and project.test_file not in patch, patch
        assert project.new_test.strip().splitlines()[0] in (artifacts / "test.patch").read_text()
        log = (artifacts / "tests.log").read_text()
        if project is DJANGOISH:  # unittest's lines, read by swebench's parser for Django
            assert f"{project.fail_to_pass} ... ok" in log, log
        else:
            assert f"PASSED {project.fail_to_pass}" in log, log
    assert sorted(reports) == sorted(AGENTS)
    for report in reports.values():
        assert report["tests_status"]["FAIL_TO_PASS"]["success"] == [project.fail_to_pass]
        assert report["tests_status"]["PASS_TO_PASS"]["success"] == [project.pass_to_pass]
        assert report["resolved"] is True


def test_every_model_call_of_the_trials_was_metered(runs: Runs) -> None:
    day_files = list((runs.settings.data / "traffic-logs" / "sets").glob("*/flows.jsonl"))
    records = [json.loads(line) for f in day_files for line in f.read_text().splitlines()]
    calls = {(r["assignment"], r["path"]) for r in records if r.get("status") == 200}
    paths = {path for _, path in calls}
    # The built-in agent asks for completions, mini-swe-agent for chat completions.
    assert {"/v1/completions", "/v1/chat/completions"} <= paths, calls
    assert len({assignment for assignment, _ in calls}) == len(PROJECTS) * len(AGENTS), calls

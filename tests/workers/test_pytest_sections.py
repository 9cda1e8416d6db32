"""workers.pytest_sections: pytest's section of a shared configuration file, cut out and put back.

What is checked is what pytest would read: the rewritten file goes through pytest's own loader
(`_pytest.config.findpaths.load_config_dict_from_file`, the function its rootdir search calls).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from _pytest.config.findpaths import load_config_dict_from_file

from workers.pytest_sections import Unmerged, merge, read

TASK_TOML = b"""[project]
name = "task"

[tool.pytest.ini_options]
# the task's own comment stays
testpaths = ["tests"]
"""


def pytest_reads(tmp_path: Path, name: str, data: bytes) -> dict[str, object] | None:
    path = tmp_path / name
    path.write_bytes(data)
    found = load_config_dict_from_file(path)
    return None if found is None else {key: value.value for key, value in found.items()}


def test_a_multi_line_string_that_looks_like_a_table_is_the_agents_text(tmp_path: Path) -> None:
    agent = b"""[project]
name = "task"
description = '''
[tool.pytest.ini_options]
addopts = "-p forge"
'''
dependencies = [
  "attrs",  # [tool.pytest.ini_options]
]

[tool.pytest.ini_options]
testpaths = ["tests"]
addopts = "-p forge"

[tool.black]
line-length = 3
"""
    merged = merge("pyproject.toml", agent, TASK_TOML)
    assert merged is not None
    assert pytest_reads(tmp_path, "pyproject.toml", merged) == {"testpaths": ["tests"]}
    doc = tomllib.loads(merged.decode())
    assert doc["project"] == tomllib.loads(agent.decode())["project"]
    assert doc["tool"]["black"] == {"line-length": 3}
    assert b"# the task's own comment stays" in merged


def test_dotted_keys_under_tool_and_the_native_table_are_pytests_too(tmp_path: Path) -> None:
    agent = b"""[tool]
pytest.addopts = ["-p", "forge"]
ruff.line-length = 90
"""
    assert read("pyproject.toml", agent) == {"addopts": ["-p", "forge"]}
    merged = merge("pyproject.toml", agent, TASK_TOML)
    assert merged is not None
    assert pytest_reads(tmp_path, "pyproject.toml", merged) == {"testpaths": ["tests"]}
    assert tomllib.loads(merged.decode())["tool"]["ruff"] == {"line-length": 90}
    assert "project" not in tomllib.loads(merged.decode())  # the agent removed it: its choice


def test_a_table_inside_an_inline_value_cannot_be_cut_out() -> None:
    with pytest.raises(Unmerged):
        merge("pyproject.toml", b'tool = {pytest = {addopts = "-p forge"}}\n', TASK_TOML)
    # An inline `tool` without pytest's table is the agent's, kept as it is.
    merged = merge("pyproject.toml", b"tool = {ruff = {x = 1}}\n", None)
    assert merged == b"tool = {ruff = {x = 1}}\n"


def test_a_table_only_the_agent_wrote_is_taken_out(tmp_path: Path) -> None:
    agent = b'[project]\r\nname = "new"\r\n\r\n[tool.pytest]\r\naddopts = ["-p", "forge"]\r\n'
    merged = merge("pyproject.toml", agent, None)
    assert merged is not None and read("pyproject.toml", merged) is None
    assert tomllib.loads(merged.decode()) == {"project": {"name": "new"}}
    assert merge("pyproject.toml", b'[tool.pytest.ini_options]\naddopts = "-x"\n', None) is None


@pytest.mark.parametrize(("name", "section"), [("setup.cfg", "tool:pytest"), ("tox.ini", "pytest")])
def test_an_ini_files_pytest_section_is_the_tasks(tmp_path: Path, name: str, section: str) -> None:
    task = f"[metadata]\nname = task\n\n[{section}]\ntestpaths = tests\n".encode()
    agent = (
        f"[metadata]\nname = task\ninstall_requires =\n    attrs\n"
        f"[{section}]  # forged\naddopts = -p forge\n    -x\n[flake8]\nmax-line-length = 99\n"
    ).encode()
    assert read(name, agent) == {section: {"addopts": "-p forge\n-x"}}
    merged = merge(name, agent, task)
    assert merged is not None
    assert pytest_reads(tmp_path, name, merged) == {"testpaths": "tests"}
    text = merged.decode()
    assert "install_requires =\n    attrs\n" in text and "[flake8]\nmax-line-length = 99\n" in text
    assert "forge" not in text


def test_a_file_that_does_not_parse_is_unmerged() -> None:
    with pytest.raises(Unmerged):
        read("pyproject.toml", b"[project\n")
    with pytest.raises(Unmerged):
        read("setup.cfg", b"no section = here\n")
    with pytest.raises(Unmerged):
        merge("setup.cfg", b"[a]\nx = 1\n", b"\xff\xfe")

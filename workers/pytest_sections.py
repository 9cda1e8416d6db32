"""The pytest section of a file that configures other things too.

`pyproject.toml`, `setup.cfg` and `tox.ini` hold a project's dependencies, build and tool
settings beside pytest's own: grading puts back only what pytest reads from them
(`[tool.pytest]` / `[tool.pytest.ini_options]`, `[tool:pytest]`, `[pytest]`) as the task had
it, and keeps the rest of the agent's file. A rewrite is made on the text (no TOML writer is a
dependency, and a round trip would reformat the agent's file) and then checked with the
parsers pytest itself uses, `tomllib` and `iniconfig`: pytest's section must read as the
task's and everything else as the agent's. When that cannot be shown (a file that does not
parse, a section written inside an inline table, a value no TOML literal here can spell),
`Unmerged` is raised and the caller restores the task's whole file, as before.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tomllib
from typing import Any

import iniconfig

SECTIONED = frozenset({"pyproject.toml", "setup.cfg", "tox.ini"})
"""File names whose pytest section alone is the task's."""
INI_SECTIONS = {"setup.cfg": ("tool:pytest", "pytest"), "tox.ini": ("pytest",)}
"""Sections pytest reads (or, `[pytest]` in setup.cfg, fails on) in each INI file."""
TOML_TABLE = ("tool", "pytest")
"""pytest 9 reads `[tool.pytest]` (native types) and `[tool.pytest.ini_options]`."""
LIMIT = 256 * 1024
"""Larger files are not rewritten section-wise (`Unmerged`): restored whole."""
_PARSED_LIMIT = 16 * LIMIT
"""Bound on the text parsed while finding where multi-line TOML statements end."""
_BOM = "\N{BYTE ORDER MARK}"


class Unmerged(ValueError):
    """The pytest section cannot be told apart or put back here: restore the whole file."""


def read(name: str, data: bytes) -> Any:
    """pytest's configuration in file `name` holding `data`, as pytest parses it: None when the
    file has none; `Unmerged` when it does not parse."""
    text = _text(data)
    if name in INI_SECTIONS:
        sections = _ini_parse(name, text)
        found = {s: sections[s] for s in INI_SECTIONS[name] if s in sections}
        return found or None
    return _toml_table(_toml_parse(text))


def merge(name: str, agents: bytes, tasks: bytes | None) -> bytes | None:
    """The agent's file with the task's pytest section (None: the task had no such file) in
    place of its own; None when nothing is left."""
    if max(len(agents), len(tasks or b"")) > LIMIT:
        raise Unmerged(f"{name}: over {LIMIT} bytes")
    agent_text = _text(agents)
    task_text = _text(tasks) if tasks is not None else ""
    if name in INI_SECTIONS:
        merged = _ini_merge(name, agent_text, task_text)
    else:
        merged = _toml_merge(agent_text, task_text)
    return merged.encode() if merged.strip() else None


def shown(name: str, data: bytes | None) -> list[str]:
    """The lines of pytest's section of a version, for the tampering diff."""
    if data is None:
        return []
    text = _text(data)
    if name in INI_SECTIONS:
        return [line for section, lines in _ini_blocks(text) if section in INI_SECTIONS[name]
                for line in lines]  # fmt: skip
    table = _toml_table(_toml_parse(text))
    return [] if table is None else _toml_render(TOML_TABLE, table)


def _text(data: bytes) -> str:
    """As pytest reads these files: UTF-8 in text mode, so any CR LF or CR is a LF."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Unmerged(f"not UTF-8: {exc}") from exc
    return text.replace("\r\n", "\n").replace("\r", "\n")


# -- INI (setup.cfg, tox.ini), as iniconfig reads it ------------------------------------------


def _ini_parse(name: str, text: str) -> dict[str, dict[str, str]]:
    try:
        config = iniconfig.IniConfig(name, data=text)
    except iniconfig.ParseError as exc:
        raise Unmerged(f"{exc}") from exc
    return {section: dict(config[section].items()) for section in config.sections}


def _ini_header(line: str) -> str | None:
    """The section a line opens, by iniconfig's own rule; None for any other line."""
    if line.lstrip()[:1] in ("#", ";"):
        return None
    line = line.rstrip()
    if not line.startswith("["):
        return None
    for char in "#;":
        line = line.split(char)[0].rstrip()
    return line[1:-1] if line.endswith("]") else None


def _ini_blocks(text: str) -> list[tuple[str | None, list[str]]]:
    """(section, its header and lines) in order; what precedes the first header has None."""
    blocks: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.removeprefix(_BOM).splitlines(keepends=True):
        section = _ini_header(line)
        if section is not None:
            blocks.append((section, []))
        blocks[-1][1].append(line)
    return blocks


def _ini_merge(name: str, agent_text: str, task_text: str) -> str:
    ours = INI_SECTIONS[name]
    theirs = _ini_parse(name, task_text)
    agents = _ini_parse(name, agent_text)
    section = "".join(_ends(lines) for s, lines in _ini_blocks(task_text) if s in ours)
    out: list[str] = []
    placed = False
    for s, lines in _ini_blocks(agent_text):
        if s in ours:
            if not placed:
                out.append(section)
                placed = True
            continue
        out.append(_ends(lines))
    if not placed and section:
        out.append(("\n" if out and "".join(out).strip() else "") + section)
    merged = "".join(out)
    got = _ini_parse(name, merged)
    want = {s: v for s, v in agents.items() if s not in ours}
    want.update({s: v for s, v in theirs.items() if s in ours})
    if got != want:
        raise Unmerged(f"{name}: its sections do not read back as the agent's and the task's")
    return merged


def _ends(lines: list[str]) -> str:
    text = "".join(lines)
    return text if not text or text.endswith("\n") else text + "\n"


# -- TOML (pyproject.toml), as tomllib reads it -----------------------------------------------

_KEY_PART = r"""[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*'"""
_KEY = rf"[ \t]*(?:{_KEY_PART})(?:[ \t]*\.[ \t]*(?:{_KEY_PART}))*[ \t]*"
_HEADER = re.compile(rf"[ \t]*\[\[?({_KEY})\]\]?")
_ASSIGN = re.compile(rf"({_KEY})=")
_BARE = re.compile(r"[A-Za-z0-9_-]+")


def _toml_parse(text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise Unmerged(f"not TOML: {exc}") from exc


def _toml_table(doc: dict[str, Any]) -> Any:
    tool = doc.get("tool")
    return tool.get("pytest") if isinstance(tool, dict) else None


def _without_table(doc: dict[str, Any]) -> dict[str, Any]:
    rest = copy.deepcopy(doc)
    tool = rest.get("tool")
    if isinstance(tool, dict):
        tool.pop("pytest", None)
        if not tool:
            del rest["tool"]
    return rest


def _key_path(key: str) -> tuple[str, ...]:
    """The key a (dotted, quoted) TOML key spells, read by tomllib itself."""
    node: Any = _toml_parse(f"{key} = 0\n")
    path: list[str] = []
    while isinstance(node, dict):
        ((name, node),) = node.items()
        path.append(name)
    return tuple(path)


def _toml_statements(text: str) -> list[tuple[tuple[str, ...], tuple[str, ...] | None, str]]:
    """(table, key, text) of each statement in order: a header's key is its table, a blank or
    comment line has None. A key/value runs to the first line where it parses whole (values
    span lines only inside arrays and multi-line strings)."""
    lines = re.findall(r"[^\n]*\n|[^\n]+$", text)
    out: list[tuple[tuple[str, ...], tuple[str, ...] | None, str]] = []
    table: tuple[str, ...] = ()
    parsed = 0
    i = 0
    while i < len(lines):
        line = lines[i]
        head = line.lstrip(" \t")
        if head in ("", "\n") or head.startswith("#"):
            out.append((table, None, line))
            i += 1
            continue
        if head.startswith("["):
            match = _HEADER.match(line)
            if match is None:
                raise Unmerged(f"line {i + 1}: a table header this reader cannot spell out")
            table = _key_path(match.group(1))
            out.append((table, table, line))
            i += 1
            continue
        match = _ASSIGN.match(line)
        if match is None:
            raise Unmerged(f"line {i + 1}: a statement this reader cannot spell out")
        key = table + _key_path(match.group(1))
        for end in range(i + 1, len(lines) + 1):
            chunk = "".join(lines[i:end])
            parsed += len(chunk)
            if parsed > _PARSED_LIMIT:
                raise Unmerged("statements too long to delimit")
            try:
                tomllib.loads(chunk)
            except tomllib.TOMLDecodeError:
                continue
            out.append((table, key, chunk))
            i = end
            break
        else:
            raise Unmerged(f"line {i + 1}: a value that never ends")
    return out


def _under(path: tuple[str, ...] | None) -> bool:
    return path is not None and path[: len(TOML_TABLE)] == TOML_TABLE


def _holds_table(table: tuple[str, ...], key: tuple[str, ...], text: str) -> bool:
    """Whether the statement `text` (key `key` in `table`) sets pytest's table inside its value
    (`tool = {pytest = …}`): that cannot be cut out of the line."""
    if len(key) >= len(TOML_TABLE) or TOML_TABLE[: len(key)] != key:
        return False
    node: Any = _toml_parse(text)
    for part in TOML_TABLE[len(table) :]:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _toml_merge(agent_text: str, task_text: str) -> str:
    agents = _toml_parse(agent_text)
    tasks = _toml_parse(task_text)
    want_table = _toml_table(tasks)
    if task_text and _without_table(agents) == _without_table(tasks):
        return task_text  # nothing else of the agent's to keep: the task's file as it was
    section = _task_section(task_text, want_table)
    out: list[str] = []
    placed = False
    for table, key, text in _toml_statements(agent_text):
        if key is not None and key != table and _holds_table(table, key, text):
            raise Unmerged(f"[{'.'.join(TOML_TABLE)}] is written inside the value of {key}")
        if _under(table) or _under(key):
            if not placed and key == table and section:
                out.append(section)
                placed = True
            continue
        out.append(text)
    merged = "".join(out)
    if not placed and section:
        merged = _ends([merged]) + ("\n" if merged.strip() else "") + section
    got = _toml_parse(merged)
    if _toml_table(got) != want_table or _without_table(got) != _without_table(agents):
        raise Unmerged("it does not read back as the agent's file with the task's pytest table")
    return merged


def _task_section(task_text: str, table: Any) -> str:
    """The task's pytest table as TOML: its own lines when written as `[tool.pytest…]` tables
    alone, else spelled out from the parsed value."""
    if table is None:
        return ""
    statements = _toml_statements(task_text)
    blocks = [text for t, _key, text in statements if _under(t)]
    if not any(_under(key) and not _under(t) for t, key, _text in statements):
        own = _ends(["".join(blocks)])
        if own.strip() and _toml_table(_toml_parse(own)) == table:
            return own
    return "".join(_toml_render(TOML_TABLE, table))


def _toml_render(path: tuple[str, ...], table: dict[str, Any]) -> list[str]:
    nested = {key: value for key, value in table.items() if isinstance(value, dict)}
    lines = [f"{_toml_key(k)} = {_toml_value(v)}\n" for k, v in table.items() if k not in nested]
    if lines or not nested:  # a table of tables alone needs no header of its own
        lines.insert(0, "[" + ".".join(_toml_key(part) for part in path) + "]\n")
    for key, value in nested.items():
        lines += ["\n"] if lines else []
        lines += _toml_render((*path, key), value)
    return lines


def _toml_key(key: str) -> str:
    return key if _BARE.fullmatch(key) else _toml_string(key)


def _toml_string(value: str) -> str:
    # JSON's escapes are TOML's, but for DEL, which TOML wants escaped too.
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise Unmerged(f"a value of type {type(value).__name__} in pytest's table")

"""The `swebench` package's own test-log parsers, by repository or by name, and the test
command of an instance's eval script.

SWE-bench reads a test run's output with a parser per repository (Django's runner, SymPy's
`bin/test`, pytest's `-rA` lines, Jest, Go, Cargo, ...). They are used as the package ships
them, never copied: `PARSER_REGISTRY` (parser name -> parser) and the per-language
`MAP_REPO_TO_PARSER_*` tables (`owner/name` -> parser) of `swebench.harness.log_parsers`.

`swebench/harness/__init__.py` imports the whole evaluation harness (docker, modal, datasets:
over 6 s); only its `log_parsers` subpackage, which needs none of that, is loaded here, under
a bare package object for `swebench.harness` (0.1 s). A process that imported the harness
first keeps it.

SWE-bench 5 keeps no test command by repository and version any more: each instance carries
its `eval_script` (the eval.sh its harness runs in the instance's Docker image), whose test
command stands between the harness's `START_TEST_OUTPUT` and `END_TEST_OUTPUT` markers
(`swebench.harness.constants`); `eval_test_command` takes it from there, and nothing else of
the script (the conda activation, `cd /testbed`, the test_patch it applies) is used.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pkgutil
import sys
import types
from collections.abc import Callable
from typing import Any

Parser = Callable[[str, Any], dict[str, str]]
"""(test output, swebench TestSpec) -> test id -> PASSED, FAILED, SKIPPED, ERROR or XFAIL."""


def _harness(module: str) -> types.ModuleType:
    """`swebench.harness.<module>`, imported without the harness's own `__init__`."""
    if "swebench.harness" not in sys.modules:
        spec = importlib.util.find_spec("swebench.harness")
        if spec is None or spec.submodule_search_locations is None:
            raise ImportError("the swebench package has no harness")
        package = types.ModuleType("swebench.harness")
        package.__path__ = list(spec.submodule_search_locations)
        package.__spec__ = spec
        sys.modules["swebench.harness"] = package
    return importlib.import_module(f"swebench.harness.{module}")


@functools.cache
def _tables() -> tuple[dict[str, Parser], dict[str, Parser]]:
    """(parsers by name, parsers by repository `owner/name`)."""
    log_parsers = _harness("log_parsers")
    by_name: dict[str, Parser] = dict(log_parsers.PARSER_REGISTRY)
    by_repo: dict[str, Parser] = {}
    modules = [log_parsers] + [
        importlib.import_module(f"{log_parsers.__name__}.{m.name}")
        for m in pkgutil.iter_modules(log_parsers.__path__)
    ]
    for module in modules:
        for attribute, table in vars(module).items():
            if attribute.startswith("MAP_REPO_TO_PARSER") and isinstance(table, dict):
                by_repo.update(table)
    return by_name, by_repo


def names() -> list[str]:
    """Every parser `swebench` has by name (`parse_log_django`, ...)."""
    return sorted(_tables()[0])


def known_repos() -> list[str]:
    """The repositories `swebench` has a parser for (`django/django`, `sympy/sympy`, ...)."""
    return sorted(_tables()[1])


def parser(name: str) -> Parser | None:
    """The parser named `name` or the one for repository `name`; None when swebench has none."""
    by_name, by_repo = _tables()
    return by_name.get(name) or by_repo.get(name)


def parse(
    output: str,
    name: str,
    *,
    instance_id: str,
    fail_to_pass: list[str],
    pass_to_pass: list[str],
    version: str = "",
) -> dict[str, str] | None:
    """Test id -> status as swebench's parser `name` reads `output`; None without such a
    parser. The parser gets the instance's TestSpec, as in SWE-bench (some read its version)."""
    found = parser(name)
    if found is None:
        return None
    from swebench.types import TestSpec

    spec = TestSpec(
        instance_id=instance_id,
        image="",
        eval_script_list=[],
        repo=name if "/" in name else "",
        version=version,
        FAIL_TO_PASS=fail_to_pass,
        PASS_TO_PASS=pass_to_pass,
        log_parser=found.__name__,
    )
    return found(output, spec)


def eval_test_command(eval_script: str) -> str | None:
    """The test command of a SWE-bench 5 `eval_script`: its lines between the harness's start
    and end markers (comments and blank lines left out); None when it has no such lines."""
    constants = _harness("constants")
    lines = eval_script.splitlines()
    starts = [i for i, line in enumerate(lines) if constants.START_TEST_OUTPUT in line]
    if not starts:
        return None
    command = []
    for line in lines[starts[0] + 1 :]:
        if constants.END_TEST_OUTPUT in line:
            break
        if line.strip() and not line.lstrip().startswith("#"):
            command.append(line.rstrip())
    else:
        return None  # no end marker: not a script of the harness's shape
    return "\n".join(command) or None


def reads_pytest(name: str) -> bool:
    """Whether the parser `name` (a parser's name or a repository's) reads pytest's output, as
    the default test command writes it; True for a name swebench has no parser for (pytest's
    is the fallback)."""
    found = parser(name)
    return found is None or found.__name__.startswith("parse_log_pytest")

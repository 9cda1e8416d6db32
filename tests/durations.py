"""How long the slower tests take, so that the longest test files are handed out first.

`pytest -n 2 --dist loadfile` gives each worker a whole file at a time, in the order of
collection when `--no-loadscope-reorder` is given (as the Makefile does). tests/conftest.py
orders the files by the sum of their selected tests' seconds in durations.json, longest
first, so that the last files handed out are short and the two workers finish together. Left
to xdist, the files with the most tests go first, and a long file of two tests (an end-to-end
run) is left to one worker at the end. A test not in the table (the table keeps those over
MIN_S) counts DEFAULT_S. The figures only order the files: a stale table costs time, never a
result.

Refresh it from a run of the whole suite on 2 cores:
`pytest -n 2 --dist loadfile --junitxml=run.xml`, then `python tests/durations.py run.xml`.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

TABLE = Path(__file__).with_name("durations.json")
MIN_S = 1.0
DEFAULT_S = 0.2
"""What a test not in the table is taken to cost: most are in-process tests."""


def load() -> dict[str, float]:
    if not TABLE.exists():
        return {}
    table: dict[str, float] = json.loads(TABLE.read_text())
    return table


def file_seconds(node_ids: Iterable[str]) -> dict[str, float]:
    """Seconds per test file (the path in a node id) of the tests `node_ids`."""
    table = load()
    seconds: dict[str, float] = defaultdict(float)
    for node_id in node_ids:
        seconds[node_id.partition("::")[0]] += table.get(node_id, DEFAULT_S)
    return seconds


def from_junit(paths: list[str]) -> dict[str, float]:
    """Seconds per test (setup, call and teardown) in JUnit XML reports, by node id; a test
    that failed or erred is left out (a timeout is no measure of the test)."""
    seconds: dict[str, float] = {}
    for path in paths:
        for case in ET.parse(path).iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                continue
            parts = case.get("classname", "").split(".")
            module = [p for p in parts if not p[:1].isupper()]
            classes = [p for p in parts if p[:1].isupper()]
            node_id = "::".join(["/".join(module) + ".py", *classes, case.get("name", "")])
            seconds[node_id] = float(case.get("time") or 0)
    return seconds


if __name__ == "__main__":
    table = {**load(), **from_junit(sys.argv[1:])}
    kept = {k: round(v, 1) for k, v in sorted(table.items()) if v >= MIN_S}
    TABLE.write_text(json.dumps(kept, indent=0) + "\n")
    print(f"{len(kept)} tests over {MIN_S} s in {TABLE}")

"""Writes a benchmark's rows to bench/results/<name>.json and its section of docs/benchmarks.md."""

from __future__ import annotations

import json
import platform
import re
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"


def machine() -> str:
    cpus = len(Path("/proc/cpuinfo").read_text().split("processor")) - 1
    return f"{platform.machine()}, {cpus} CPUs, Python {platform.python_version()}"


def table(rows: list[dict[str, Any]]) -> str:
    """Rows as a Markdown table, one column per key in the order first seen."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def publish(
    name: str,
    command: str,
    rows: list[dict[str, Any]],
    notes: str,
    extra: dict[str, Any] | None = None,
) -> None:
    """`rows` are the section's table; `extra` (more tables by name) goes to the JSON only."""
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    data = {
        "benchmark": name,
        "command": command,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
        **(extra or {}),
    }
    (results / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")

    section = (
        f"<!-- bench:{name} -->\n## {name}\n\n"
        f"Command: `{command}` — {data['date']}, {data['machine']}.\n\n"
        + table(rows)
        + f"\n\n{notes.strip()}\n<!-- /bench:{name} -->"
    )
    text = (
        DOC.read_text()
        if DOC.exists()
        else "# Benchmarks\n\nEvery figure here was written by the command above it.\n"
    )
    pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
    text = (
        pattern.sub(lambda _m: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    DOC.write_text(text)

"""Report outputs: each format written, and each one parses back to the same numbers."""

from __future__ import annotations

import csv
import json
import struct
from decimal import Decimal
from pathlib import Path

import pytest
from test_report import HEAD, fixed_records, to_cad

from contracts.reports import TrialReport
from orchestrator.report import FORMATS, curve_from_reports, summarize, write_outputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which always comes first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_every_format_is_written_and_parses(tmp_path: Path) -> None:
    report = summarize(HEAD, fixed_records(), to_cad)
    later = summarize(
        HEAD.model_copy(update={"id": "t2", "name": "later", "created_at": "2025-03-02T10:00:00Z"}),
        fixed_records()[:6],
        to_cad,
    )
    curve = curve_from_reports([later, report], "demo")
    written = write_outputs(report, tmp_path / "out", FORMATS, curve=curve)
    assert sorted(written) == sorted(FORMATS)

    (json_path,) = written["json"]
    data = json.loads(json_path.read_text())
    assert data == {**report.to_json(), "learning_curve": curve.to_json()}
    assert TrialReport.model_validate(data) == report  # the file reads back to the same report
    assert data["rows"][0]["cost"] == "0.082800" and data["rows"][0]["success_ci95"] == [
        0.0968,
        0.7,
    ]
    assert [p["name"] for p in data["learning_curve"]["points"]] == ["fixed", "later"]

    (csv_path,) = written["csv"]
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["agent"], r["model"]) for r in rows] == [
        ("builtin", "tiny"),
        ("builtin", "tiny:thinking"),
        ("other", "tiny"),
    ]
    first = rows[0]
    assert (first["n"], first["resolved"], first["success_rate"]) == ("6", "2", "0.3333")
    assert (first["success_ci95_low"], first["success_ci95_high"]) == ("0.0968", "0.7")
    assert (first["currency"], Decimal(first["cost_per_resolved"])) == ("CAD", Decimal("0.0414"))
    assert (first["errors_timeout"], first["errors_infra"]) == ("1", "0")
    assert rows[2]["cost_per_resolved"] == ""  # resolved nothing: no such cost

    (md_path,) = written["md"]
    md = md_path.read_text()
    assert md.startswith("# Trial fixed (t1)\n")
    assert "| builtin | tiny | 6 | 2 | 1 | 2/6 = 33% [10%, 70%] |" in md
    assert "| model pairs | tiny (2/9) | tiny:thinking (6/6) |" in md
    assert "| yes |" in md and "| no |" in md
    for png in written["png"]:
        assert f"]({png.name})" in md

    cost_png, curve_png = written["png"]
    assert cost_png.name == "report-t1-cost.png" and curve_png.name == "report-t1-curve.png"
    for png in (cost_png, curve_png):
        width, height = png_size(png)
        assert 600 <= width <= 3000 and 300 <= height <= 3000, (png, width, height)
        assert png.stat().st_size > 20_000  # drawn, not a blank canvas


def test_formats_are_chosen_and_checked(tmp_path: Path) -> None:
    report = summarize(HEAD, fixed_records(), to_cad)
    written = write_outputs(report, tmp_path, ["csv", "md"])
    assert sorted(written) == ["csv", "md"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report-t1.csv", "report-t1.md"]
    assert "![" not in written["md"][0].read_text()  # no chart was drawn, none is linked
    with pytest.raises(ValueError, match="unknown report format pdf; allowed: json, csv, md, png"):
        write_outputs(report, tmp_path, ["pdf"])


def test_cost_chart_without_any_resolved_task(tmp_path: Path) -> None:
    records = [r for r in fixed_records() if r.agent == "other"]
    report = summarize(HEAD, records, to_cad)
    (png,) = write_outputs(report, tmp_path, ["png"])["png"]
    assert png_size(png)[0] > 600

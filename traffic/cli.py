"""`autovibe traffic search TEXT`: full-text search of the captured traffic (SQLite index)."""

from __future__ import annotations

import datetime as dt
import sqlite3
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from traffic.sqlite_store import SqliteTrafficStore

app = typer.Typer(help="Captured traffic: the spool and its index.", no_args_is_help=True)
err = Console(stderr=True, soft_wrap=True)


@app.callback()
def traffic() -> None:
    """Captured traffic: the spool and its index."""


@app.command()
def search(
    query: Annotated[str, typer.Argument(help='FTS5 query: words, "a phrase", a OR b, pre*.')],
    limit: Annotated[int, typer.Option(help="Most flows shown, best matches first.")] = 20,
    project: Annotated[str | None, typer.Option(help="Only this project's flows.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One capture record per line.")] = False,
) -> None:
    """Flows whose url, model, error, bodies or websocket messages match QUERY."""
    root = DataRoot.at(Settings().data)
    with SqliteTrafficStore(root.traffic_index) as index:
        # The proxy indexes as it runs; catching up here also serves a proxy that is stopped.
        index.catch_up(root.traffic_logs)
        try:
            found = index.search(query, limit=limit, project=project)
        except sqlite3.OperationalError as exc:
            err.print(f"[red]error:[/red] bad FTS5 query {query!r}: {exc}", highlight=False)
            raise typer.Exit(2) from exc
    if as_json:
        for record in found:
            print(record.model_dump_json())
        return
    table = Table("id", "started (UTC)", "project", "status", "method", "url", "error")
    for record in found:
        started = dt.datetime.fromtimestamp(record.ts_start, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(
            record.id,
            started,
            record.project or "",
            "" if record.status is None else str(record.status),
            record.method,
            record.url,
            record.error or "",
        )
    Console().print(table)  # made here: it reads the terminal width (COLUMNS) of this call

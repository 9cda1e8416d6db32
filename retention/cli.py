"""`autovibe retention …`: apply the retention policy, or render system configs from it."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.filesize import decimal
from rich.table import Table

from contracts.config import ConfigError
from contracts.dataroot import DataRoot
from contracts.settings import Settings
from retention import compress
from retention import render as render_mod
from retention.apply import Action, RetentionError, plan
from retention.apply import apply as apply_actions
from retention.policy import RetentionPolicy, load_policy

app = typer.Typer(
    help="Delete what the retention policy says has expired; render system configs from it.",
    no_args_is_help=True,
)
console = Console()
if not console.is_terminal:  # logs and pipes: wide enough for data-root paths
    console = Console(width=160)
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole in logs

PolicyOption = Annotated[
    Path | None,
    typer.Option(help="Policy file [default: retention-policies.yaml in the configs folder]."),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _load(policy: Path | None) -> tuple[Path, RetentionPolicy]:
    path = policy or Settings().configs / "retention-policies.yaml"
    try:
        return path, load_policy(path)
    except ConfigError as exc:
        raise _fail(f"{path} is not a valid retention policy:\n{exc}", 2) from exc
    except FileNotFoundError as exc:
        raise _fail(f"{path}: no such file", 2) from exc


def _table(actions: list[Action], root: DataRoot, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("path")
    table.add_column("age (days)", justify="right")
    table.add_column("size", justify="right")
    table.add_column("action")
    for a in actions:
        table.add_row(
            str(a.path.relative_to(root.root)), str(a.age_days), decimal(a.size), a.action
        )
    table.add_section()
    unit = "folders" if all(a.action == "delete" for a in actions) else "files"
    table.add_row(f"{len(actions)} {unit}", "", decimal(sum(a.size for a in actions)))
    return table


@app.command()
def apply(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would change; change nothing.")
    ] = False,
    policy: PolicyOption = None,
) -> None:
    """Delete what the policy says has expired and LZ4-compress what it says to, listing both."""
    _, rules = _load(policy)
    root = DataRoot.at(Settings().data)
    now = dt.datetime.now(dt.UTC)
    try:
        deletes = plan(root, rules, now)
        compressions = compress.plan(root, rules, now)
    except OSError as exc:
        raise _fail(f"cannot read {exc.filename}: {exc.strerror}") from exc
    if not deletes and not compressions:
        console.print(f"nothing has expired under {root.root}")
        return
    for actions, verb, doing in (
        (deletes, "delete", "deleting"),
        (compressions, "compress", "compressing"),
    ):
        if actions:
            title = f"would {verb} (dry run)" if dry_run else doing
            console.print(_table(actions, root, f"{title} under {root.root}"))
    if dry_run:
        return
    try:
        deleted = apply_actions(deletes, root, rules)
        compressed = compress.apply(compressions, root, rules)
    except RetentionError as exc:
        raise _fail(str(exc)) from exc
    except OSError as exc:
        raise _fail(f"cannot change {exc.filename}: {exc.strerror}") from exc
    if deletes:
        console.print(
            f"deleted {len(deleted)} folders, {decimal(sum(a.size for a in deleted))} freed"
        )
    if compressions:
        before = sum(a.size for a in compressions if a.path in {d.path for d in compressed})
        console.print(
            f"compressed {len(compressed)} files, "
            f"{decimal(before)} → {decimal(sum(a.size for a in compressed))}"
        )


@app.command()
def render(
    dest: Path,
    policy: PolicyOption = None,
    executable: Annotated[
        Path | None,
        typer.Option(help="The autovibe command the systemd unit runs [default: this one]."),
    ] = None,
) -> None:
    """Write logrotate, cron (tmpreaper), systemd and ES ILM files for the data root to DEST."""
    path, rules = _load(policy)
    root = DataRoot.at(Settings().data)
    command = executable or Path(sys.executable).with_name("autovibe")
    try:
        written = render_mod.render(rules, root, dest, command.absolute(), path.resolve())
    except ValueError as exc:
        raise _fail(str(exc), 2) from exc
    for file in written:
        console.print(f"wrote {file}")

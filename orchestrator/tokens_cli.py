"""`autovibe tokens`: create, list and revoke control-API tokens (only their hashes are kept)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from orchestrator.access import TokenError, TokenScope, TokenStore

app = typer.Typer(help="Control-API tokens: scopes admin, operator, viewer, machine.")


def _store() -> TokenStore:
    return TokenStore(DataRoot.at(Settings().data))


@app.command()
def create(
    scope: Annotated[TokenScope, typer.Option(help="What the token may do.")],
    project: Annotated[
        str | None, typer.Option(help="The only project a machine token may touch.")
    ] = None,
    machine: Annotated[
        str | None,
        typer.Option(help="The machine a machine token pays as (its daily allowance)."),
    ] = None,
) -> None:
    """Create a token and print it once; only its sha256 is stored."""
    try:
        record, token = _store().create(scope, project, machine)
    except TokenError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"{record.id} ({record.scope}) — shown once, keep it now:")
    typer.echo(token)


@app.command("ls")
def list_tokens() -> None:
    """Every token: id, scope, project, machine, created, revoked (never the token)."""
    table = Table("id", "scope", "project", "machine", "created", "revoked")
    for t in _store().tokens():
        table.add_row(
            t.id, str(t.scope), t.project or "", t.machine or "", t.created, t.revoked or ""
        )
    Console().print(table)


@app.command()
def revoke(token_id: Annotated[str, typer.Argument(help="Token id from `ls`.")]) -> None:
    """Revoke a token; a running API refuses it from its next request."""
    try:
        record = _store().revoke(token_id)
    except TokenError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"revoked {record.id} at {record.revoked}")

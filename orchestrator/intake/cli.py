"""`autovibe intake …`: run the intake channels in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer

from contracts.config import ConfigError
from contracts.secrets import SecretStoreError
from contracts.settings import Settings
from orchestrator.client import ApiError
from orchestrator.intake import service

app = typer.Typer(help="Intake channels: the GitHub issue queue.", no_args_is_help=True)


@app.command("github")
def github(
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
) -> None:
    """Watch the configured repositories' labelled issues and run each once as a trial."""
    try:
        service.run(Settings(), once=once)
    except (service.IntakeNotConfigured, ConfigError, SecretStoreError, ApiError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

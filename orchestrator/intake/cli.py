"""`autovibe intake …`: run the intake channels in the foreground."""

from __future__ import annotations

from typing import Annotated

import typer
import yaml

from contracts.config import ConfigError
from contracts.secrets import SecretStoreError
from contracts.settings import Settings
from orchestrator.client import ApiError, Client

app = typer.Typer(
    help="Intake channels: the GitHub issue queue, the Telegram bot.", no_args_is_help=True
)


@app.command("github")
def github(
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
) -> None:
    """Watch the configured repositories' labelled issues and run each once as a trial."""
    # Here, not at the top: the channels' clients and the state DB cost every command ~1 s.
    from orchestrator.intake import service

    try:
        service.run(Settings(), "github", once=once)
    except (service.IntakeNotConfigured, ConfigError, SecretStoreError, ApiError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command("telegram")
def telegram(
    once: Annotated[bool, typer.Option("--once", help="One round, then exit.")] = False,
) -> None:
    """Answer the allowlisted operators' commands in Telegram and push budget alerts."""
    from orchestrator.intake import service

    try:
        service.run(Settings(), "telegram", once=once)
    except (service.IntakeNotConfigured, ConfigError, SecretStoreError, ApiError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def ask(
    request: Annotated[str, typer.Argument(help="What you want, in plain language.")],
    submit: Annotated[
        bool,
        typer.Option("--submit", help="Submit the draft after showing it, if it has no problem."),
    ] = False,
) -> None:
    """Turn a request into a draft trial (the concierge) and show it; `--submit` submits it."""
    from orchestrator.intake.concierge import ConciergeDraft

    try:
        client = Client(Settings())
        draft = ConciergeDraft.model_validate(client.concierge(request))
    except ApiError as exc:
        typer.echo("error: " + "\n".join(exc.problems()), err=True)
        raise typer.Exit(1) from exc
    typer.echo(yaml.safe_dump(draft.draft, sort_keys=False, allow_unicode=True), nl=False)
    for problem in draft.problems:
        typer.echo(f"problem: {problem}", err=True)
    if not submit:
        typer.echo(
            "draft only: run again with --submit to submit it"
            if draft.valid
            else "draft only, not submittable as it is: fix the problems above",
            err=True,
        )
        return
    if not draft.valid:
        typer.echo("not submitted: the draft has problems", err=True)
        raise typer.Exit(2)
    try:
        created = client.submit(draft.draft)
    except ApiError as exc:
        typer.echo("not submitted:\n" + "\n".join(exc.problems()), err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"submitted trial {created['name']}: id {created['id']}")

"""What the `autovibe …` commands share: where an error line goes and how a command ends on it."""

from __future__ import annotations

import typer
from rich.console import Console

from contracts.dataroot import DataRoot
from contracts.settings import Settings

err = Console(stderr=True, soft_wrap=True)
"""Standard error, soft-wrapped: an error line stays whole in logs."""


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: <message>` (Rich markup allowed) on standard error; the Exit to raise."""
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def data_root() -> DataRoot:
    """The data root the settings name (AUTOVIBE_DATA)."""
    return DataRoot.at(Settings().data)

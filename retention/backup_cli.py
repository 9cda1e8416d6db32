"""`autovibe backup DEST` and `autovibe restore SRC`: a consistent snapshot of a data root."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.filesize import decimal

from contracts.dataroot import DataRoot
from contracts.settings import Settings
from retention.backup import BackupError
from retention.backup import backup as take_backup
from retention.backup import restore as bring_back

console = Console()
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def backup(dest: Path) -> None:
    """Snapshot the data root into DEST: state DB, ledgers, configs, CA and secret store."""
    settings = Settings()
    try:
        manifest = take_backup(DataRoot.at(settings.data), dest, state_url=settings.state_url)
    except BackupError as exc:
        raise _fail(str(exc)) from exc
    size = sum(f["size"] for f in manifest["files"])
    console.print(f"backed up {len(manifest['files'])} files ({decimal(size)}) into {dest}")


def restore(
    src: Path,
    force: Annotated[
        bool, typer.Option("--force", help="Restore over a data root that is not empty.")
    ] = False,
) -> None:
    """Check every file of backup SRC against its manifest, then restore it into the data root."""
    settings = Settings()
    root = DataRoot.at(settings.data)
    try:
        manifest = bring_back(src, root, state_url=settings.state_url, force=force)
    except BackupError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"restored {len(manifest['files'])} files into {root.root}")

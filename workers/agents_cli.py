"""`autovibe agents`: install agents into the data root and list what is usable."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from contracts.settings import Settings
from workers.agents import AGENTS
from workers.agents import install as installer

app = typer.Typer(help="Agent adapters: install and list.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


@app.command("install")
def install(
    name: Annotated[str, typer.Argument(help=f"One of: {', '.join(sorted(installer.PACKAGES))}.")],
) -> None:
    """Install (or upgrade) an agent into <data>/agents/NAME/."""
    root = Settings().data
    try:
        found = installer.install(name, root)
    except installer.InstallError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    console.print(f"installed {name} {found.version} ({found.package}) in {found.path}")


@app.command("ls")
def ls() -> None:
    """Every agent adapter: its version where usable, else how to install it."""
    root = Settings().data
    versions = installer.installed_versions(root)
    for name in sorted(AGENTS):
        if name in installer.BUNDLED:
            from workers.agents import get_agent

            console.print(f"{name:16} {get_agent(name).version():12} bundled")
        elif name in versions:
            console.print(f"{name:16} {versions[name]:12} installed")
        else:
            console.print(f"{name:16} {'-':12} {installer.install_hint(name)}")

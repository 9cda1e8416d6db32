"""`autovibe dashboards`: dashboard bundles for the BI tools beside the platform (Superset)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from contracts.settings import Settings
from orchestrator import superset as superset_bundle

app = typer.Typer(help="Dashboard bundles: Superset.", no_args_is_help=True)


@app.callback()
def dashboards() -> None:
    """Dashboard bundles to import into a BI tool."""


@app.command()
def superset(
    out: Annotated[Path, typer.Option(help="Zip to write (`superset import-dashboards -p`).")],
    data: Annotated[
        Path | None,
        typer.Option(help="Data root the SQLite stores are read from; default $AUTOVIBE_DATA."),
    ] = None,
    es: Annotated[
        str | None,
        typer.Option(
            help="Elasticsearch URL, http(s)://[user:password@]host:port: adds the dashboard "
            "whose traffic charts read Elasticsearch (elasticsearch-dbapi)."
        ),
    ] = None,
) -> None:
    """Build the Superset dashboard bundle from configs/superset/."""
    root = data if data is not None else Settings().data
    try:
        bundle = superset_bundle.build(root, es_url=es)
    except superset_bundle.BundleError as exc:
        raise typer.BadParameter(str(exc)) from exc
    superset_bundle_path = bundle.write(out)
    dashboards = [d["dashboard_title"] for d in bundle.of_kind("dashboards").values()]
    typer.echo(
        f"wrote {superset_bundle_path} (Superset {superset_bundle.SUPERSET_VERSION}): "
        + "; ".join(dashboards)
    )
    typer.echo(f"import with: superset import-dashboards -p {superset_bundle_path} -u admin")

"""Which CPU model server `autovibe up` starts: `model_server`, a short name, picks the function
that builds its command (each takes the settings and the model catalogue)."""

from __future__ import annotations

from contracts.adapters import resolve
from contracts.config import ModelsCatalog
from contracts.settings import Settings

SERVERS = {
    "llamacpp": "serving.llamacpp:server_argv",
    "deterministic": "serving.deterministic:server_argv",
}
"""Short name -> `server_argv(settings, catalog)` of that server."""


def server_argv(settings: Settings, catalog: ModelsCatalog) -> list[str]:
    """The command of the model server `settings.model_server` names, serving the catalogue's
    CPU pairs on `settings.model_port`."""
    build = resolve(
        "model server", settings.model_server, SERVERS, source=" ($AUTOVIBE_MODEL_SERVER)"
    )
    argv: list[str] = build(settings, catalog)
    return argv

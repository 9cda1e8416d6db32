"""ASGI entry point for uvicorn: `uvicorn orchestrator.app:app` (settings from AUTOVIBE_*).

Logs go to stderr as JSON lines (`orchestrator.logging`); start uvicorn with
`--log-config` unset so its own loggers propagate into ours.
"""

from orchestrator.api import create_app
from orchestrator.logging import configure

configure()
app = create_app()

"""ASGI entry point for uvicorn: `uvicorn orchestrator.app:app` (settings from AUTOVIBE_*)."""

from orchestrator.api import create_app

app = create_app()

"""The API's logs as JSON lines (`common.logs`), uvicorn's included."""

from __future__ import annotations

import logging
from typing import Any

from common import logs
from common.logs import JsonFormatter

__all__ = ["JsonFormatter", "configure"]


def configure(level: str | None = None, stream: Any = None) -> logging.Handler:
    """Send the root logger and uvicorn's loggers to `stream` (stderr) as JSON lines.

    The level comes from `level`, else `$AUTOVIBE_LOG_LEVEL`, else INFO.
    """
    handler = logs.configure(level, stream)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
        # A dictConfig run earlier in the process (uvicorn's own, or a library's with
        # disable_existing_loggers) may have disabled it or set its own level.
        logger.disabled = False
        logger.setLevel(logging.NOTSET)
    return handler

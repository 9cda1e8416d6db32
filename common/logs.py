"""Structured logs: one JSON object per line, for Filebeat / Elasticsearch and `jq`.

Every record carries `ts` (RFC 3339, UTC), `level`, `logger`, `msg` and `pid`; anything passed
with `extra={...}` becomes a field of its own, and an exception its `exc` text. Every plane's
process (API, proxy, worker runner) logs through this formatter.

No line keeps a credential: query-parameter values named like one (`?token=`), URL passwords,
bearer tokens and autovibe's own token shapes are replaced by `[REDACTED]`
(`contracts.secrets.redact_credentials`), so an access log line for `GET /x?token=…` is safe.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from typing import Any

from contracts.secrets import redact_credentials

LEVEL_ENV = "AUTOVIBE_LOG_LEVEL"

# The attributes every LogRecord has; anything else on a record came from `extra`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One record as one redacted JSON line; values JSON cannot hold are written as `str()`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        out |= {k: v for k, v in vars(record).items() if k not in _STANDARD}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return redact_credentials(json.dumps(out, default=str, ensure_ascii=False))


def json_handler(stream: Any = None) -> logging.StreamHandler[Any]:
    """A handler writing JSON lines to `stream` (stderr)."""
    handler: logging.StreamHandler[Any] = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    return handler


def configure(level: str | None = None, stream: Any = None) -> logging.Handler:
    """Make JSON lines on `stream` (stderr) the root logger's only output.

    The level comes from `level`, else `$AUTOVIBE_LOG_LEVEL`, else INFO.
    """
    handler = json_handler(stream)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get(LEVEL_ENV) or "INFO").upper())
    return handler

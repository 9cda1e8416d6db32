"""An assignment's artifacts never keep a stored secret: redaction at the end of a run.

The agent writes its own transcript, log and workspace; whatever secret value it saw (a
leaked prompt, a key echoed by a tool) is replaced by `[REDACTED]` in every file under the
assignment's folder once the agent has stopped. The runner reads the secret store for this,
outside the sandbox; the agent never does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from contracts.adapters import UnknownAdapter
from contracts.dataroot import atomic_write
from contracts.secrets import SecretStoreError, redact_text, redactable
from contracts.settings import Settings

log = logging.getLogger(__name__)


def stored_secrets(data_root: Path | None) -> list[str]:
    """Every value in the platform's secret store (`$AUTOVIBE_SECRET_STORE`) worth searching for."""
    from secretstore import store_from_env  # the adapters load only when a run ends

    settings = Settings() if data_root is None else Settings(data=data_root)
    return redactable(store_from_env(settings=settings).values())


def redact_tree(folder: Path, secrets: list[str]) -> list[Path]:
    """Rewrite every regular file below `folder` that holds a secret; the files rewritten."""
    if not secrets:
        return []
    needles = [s.encode(errors="surrogateescape") for s in secrets]
    changed = []
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.is_file():
                continue
            data = path.read_bytes()
            if not any(n in data for n in needles):
                continue
            # surrogateescape round-trips any bytes, so binary files survive untouched elsewhere.
            text = redact_text(data.decode(errors="surrogateescape"), secrets)
            atomic_write(path, text.encode(errors="surrogateescape"), path.stat().st_mode & 0o7777)
            changed.append(path)
    return changed


def redact_artifacts(artifacts: Path, data_root: Path | None) -> list[Path]:
    """Redact the assignment's folder; an unreadable store is logged, never fatal to the run."""
    try:
        secrets = stored_secrets(data_root)
    except (SecretStoreError, UnknownAdapter) as exc:
        log.warning("artifacts of %s not redacted: secret store unavailable: %s", artifacts, exc)
        return []
    changed = redact_tree(artifacts, secrets)
    if changed:
        log.warning(
            "redacted stored secrets from %d artifact file(s) under %s", len(changed), artifacts
        )
    return changed

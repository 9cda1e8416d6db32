"""Operator bearer token: created in the data root at first start and printed once."""

from __future__ import annotations

import hmac
import secrets
from pathlib import Path

from contracts.dataroot import DataRoot, write_secret_file

TOKEN_FILE = "operator-token"


def token_path(root: DataRoot) -> Path:
    return root.secrets / TOKEN_FILE


def ensure_token(root: DataRoot) -> tuple[str, bool]:
    """The operator token, and whether it was created just now (then it is shown once)."""
    path = token_path(root)
    if path.exists():
        return path.read_text().strip(), False
    token = "avt_" + secrets.token_urlsafe(32)
    write_secret_file(path, token)
    return token, True


def matches(expected: str, header: str | None) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(expected.encode(), header.removeprefix("Bearer ").strip().encode())

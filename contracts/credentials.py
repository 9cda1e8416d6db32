"""Machine credentials: short-lived, signed tokens that a worker presents as proxy auth.

The orchestrator mints one per assignment; the proxy verifies it with the same key and learns
who is calling (project, trial, assignment, machine) without a shared database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from contracts.dataroot import DataRoot, write_secret_file

KEY_FILE = "machine-credential.key"


class CredentialError(Exception):
    """The credential is malformed, forged or expired."""


@dataclass(frozen=True)
class MachineIdentity:
    project: str
    trial: str
    assignment: str
    machine: str
    expires: float
    task: str = ""
    """The task the assignment works on; the proxy charges its optional per-task budget."""


def load_or_create_key(root: DataRoot) -> bytes:
    path = root.secrets / KEY_FILE
    if not path.exists():
        write_secret_file(path, secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def mint(key: bytes, identity: MachineIdentity) -> str:
    body = _b64(json.dumps(asdict(identity), separators=(",", ":")).encode())
    sig = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    return f"av1.{body}.{sig}"


def verify(key: bytes, token: str, now: float | None = None) -> MachineIdentity:
    try:
        version, body, sig = token.split(".")
    except ValueError as exc:
        raise CredentialError("malformed machine credential") from exc
    if version != "av1":
        raise CredentialError(f"unknown credential version {version!r}")
    expected = _b64(hmac.new(key, body.encode(), hashlib.sha256).digest())
    if not hmac.compare_digest(expected, sig):
        raise CredentialError("machine credential signature does not match")
    try:
        identity = MachineIdentity(**json.loads(_unb64(body)))
    except (ValueError, TypeError) as exc:
        raise CredentialError("machine credential payload is unreadable") from exc
    if identity.expires < (time.time() if now is None else now):
        raise CredentialError("machine credential has expired")
    return identity


def proxy_url(host: str, port: int, machine: str, token: str) -> str:
    """The HTTP(S)_PROXY value a worker uses: machine name as user, token as password."""
    return f"http://{machine}:{token}@{host}:{port}"


def key_path(root: DataRoot) -> Path:
    return root.secrets / KEY_FILE

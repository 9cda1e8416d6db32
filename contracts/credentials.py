"""Machine credentials: short-lived, signed tokens that a worker presents as proxy auth.

The orchestrator mints one per assignment; the proxy verifies it with the same key and learns
who is calling (project, trial, assignment, machine) without a shared database. When the
assignment ends the orchestrator revokes its credential: the assignment id is appended to a
small append-only file next to the key, which the proxy re-reads whenever it changes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from contracts.dataroot import DataRoot, write_secret_file

KEY_FILE = "machine-credential.key"
REVOKED_FILE = "revoked-assignments"
"""One revoked assignment id a line, appended to and never rewritten."""
CREDENTIAL_GRACE_S = 3600
"""How long a credential outlives the longest its holder may run (queues, copies, grading)."""


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
    egress_allow: tuple[str, ...] | None = None
    """Where the worker may go besides the model plane and the providers (`contracts.egress`
    rules): its trial's list, within its project's. None: the proxy's AUTOVIBE_EGRESS_ALLOW."""
    egress_tcp_allow: tuple[str, ...] | None = None
    """`host:port` the worker may reach with raw TCP; None: the proxy's own list."""


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
        fields = json.loads(_unb64(body))
        for name in ("egress_allow", "egress_tcp_allow"):
            if fields.get(name) is not None:  # JSON has lists; the identity is hashable
                fields[name] = tuple(str(entry) for entry in fields[name])
        identity = MachineIdentity(**fields)
    except (ValueError, TypeError, AttributeError) as exc:
        raise CredentialError("machine credential payload is unreadable") from exc
    if identity.expires < (time.time() if now is None else now):
        raise CredentialError("machine credential has expired")
    return identity


class VerifiedTokens:
    """`verify` with one key, remembering each token it accepted until the token expires.

    The proxy sees the same credential on every request of an assignment; checking its HMAC
    and parsing its payload once is enough. A hit is the exact token string accepted before
    under this key, and expiry is checked again on every hit. Revocation is not cached here
    (`is_revoked` is asked on every request). Bounded: the memory is dropped when full.
    """

    def __init__(self, key: bytes, size: int = 4096) -> None:
        self.key = key
        self.size = size
        self._accepted: dict[str, MachineIdentity] = {}

    def verify(self, token: str, now: float | None = None) -> MachineIdentity:
        now = time.time() if now is None else now
        identity = self._accepted.get(token)
        if identity is None:
            identity = verify(self.key, token, now)
            if len(self._accepted) >= self.size:
                self._accepted.clear()
            self._accepted[token] = identity
        elif identity.expires < now:
            del self._accepted[token]
            raise CredentialError("machine credential has expired")
        return identity


def proxy_url(host: str, port: int, machine: str, token: str) -> str:
    """The HTTP(S)_PROXY value a worker uses: machine name as user, token as password."""
    return f"http://{machine}:{token}@{host}:{port}"


def platform_proxy_url(
    key: bytes,
    host: str,
    port: int,
    *,
    machine: str,
    project: str,
    trial: str,
    assignment: str,
    lifetime_s: float,
) -> str:
    """The proxy URL a platform machine (the confidence judge, a task's setup) calls through
    for `assignment` of `project`'s `trial`: a credential of machine `machine` for
    `<assignment>-<machine>`, so what it spends is the project's and that machine's, never the
    agent's; valid `lifetime_s` plus CREDENTIAL_GRACE_S, and with no egress list of its own
    (the proxy applies the one it was started with)."""
    identity = MachineIdentity(
        project=project,
        trial=trial,
        assignment=f"{assignment}-{machine}",
        machine=machine,
        expires=time.time() + lifetime_s + CREDENTIAL_GRACE_S,
    )
    return proxy_url(host, port, machine, mint(key, identity))


def proxy_env(url: str, ca: Path) -> dict[str, str]:
    """A sandbox's way out: every spelling of the proxy variables set to `url`, nothing bypassed,
    and the proxy's CA certificate for the TLS stacks that read a variable of their own."""
    return {
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": "",
        "no_proxy": "",
        "SSL_CERT_FILE": str(ca),
        "REQUESTS_CA_BUNDLE": str(ca),
        "NODE_EXTRA_CA_CERTS": str(ca),
    }


def key_path(root: DataRoot) -> Path:
    return root.secrets / KEY_FILE


def revoked_path(root: DataRoot) -> Path:
    return root.secrets / REVOKED_FILE


def revoke(root: DataRoot, assignment: str) -> None:
    """Refuse the assignment's machine credential from now on (idempotent)."""
    if not assignment or "\n" in assignment:
        raise CredentialError(f"cannot revoke assignment id {assignment!r}")
    if is_revoked(root, assignment):
        return
    path = revoked_path(root)
    DataRoot.ensure(path.parent, mode=0o700)
    # One short O_APPEND write per id: concurrent revocations never interleave within a line.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{assignment}\n".encode())
    finally:
        os.close(fd)


class _RevokedCache:
    """The revocation list as last read, read again only when the file's stat changes, and then
    only what was appended since (the file only grows): a list of every assignment ever ended,
    read whole after each revocation, made a fleet's endings quadratic."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[tuple[int, int, int], int, frozenset[str]]] = {}
        """Path -> its (inode, size, mtime), the bytes read up to the last full line, the ids."""

    def ids(self, path: str) -> frozenset[str]:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return frozenset()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._seen.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[2]
        # Appended to: only the new lines are read. Replaced or shrunk: read whole.
        grown = hit is not None and hit[0][0] == st.st_ino and st.st_size >= hit[1]
        offset, known = (hit[1], hit[2]) if grown and hit is not None else (0, frozenset())
        with open(path, "rb") as fh:
            fh.seek(offset)
            tail = fh.read()
        # A line still being appended has no newline yet; it is read complete next time.
        complete = tail[: tail.rfind(b"\n") + 1]
        ids = known.union(line for line in complete.decode().split("\n") if line)
        with self._lock:
            self._seen[path] = (stamp, offset + len(complete), ids)
        return ids


_revoked = _RevokedCache()
_revoked_files: dict[Path, str] = {}
"""Data root -> its revocation file as a string: asked on every proxied request, so no pathlib."""


def is_revoked(root: DataRoot, assignment: str) -> bool:
    """Whether the assignment's credential was revoked (a stat per call, a read per change)."""
    path = _revoked_files.get(root.root)
    if path is None:
        path = _revoked_files[root.root] = str(revoked_path(root))
    return assignment in _revoked.ids(path)

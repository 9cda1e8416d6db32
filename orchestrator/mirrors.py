"""Task repositories named by URL: one bare mirror each, and trees exported from them.

A trial's task may name its repository by URL (`https://`, `http://`, `ssh://`, `git://`,
`file://`) with a `commit` or a `ref`. The orchestrator keeps one bare mirror per repository
under `$AUTOVIBE_DATA/tasks/mirrors/` and fetches only what it lacks: a pinned commit already
there costs no network. Each commit used is exported once to `tasks/trees/<mirror>/<commit>/`,
files only and no `.git`, so the workspace made from it (`workers.workspace.prepare`: a fresh
repository of one baseline commit) holds no history and no remote: a later fix commit cannot
be reached from the sandbox, which sees nothing of the data root.

Git runs isolated (`workers.workspace.isolated_git`): no system or global configuration, no
hooks, only the transports above, never a prompt. A first clone is built beside its place and
renamed in; a fetch updates refs atomically, under a lock per mirror; a tree is exported beside
its place and renamed in, so an interrupted run leaves nothing that looks finished. A URL's
credentials are never part of a name on disk nor of an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from common.locks import exclusive
from contracts.dataroot import DataRoot
from workers.workspace import NEUTRAL_ATTRIBUTES, WorkspaceError, isolated_git

FETCH_TIMEOUT_S = 1800.0
"""Longest a clone or fetch may take before it is abandoned (a hung server)."""
PROTOCOLS = "https:http:ssh:git:file"
"""The only transports git may use (GIT_ALLOW_PROTOCOL): no `ext::`, whatever a server says."""
PIN = "refs/autovibe/commits/"
"""Every commit a trial used gets a ref here, so no fetch or gc ever loses it."""
_PASSED_ON = ("HOME", "SSH_AUTH_SOCK", "GIT_SSH_COMMAND", "HTTP_PROXY", "HTTPS_PROXY",
              "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")  # fmt: skip
"""What a fetch keeps of the orchestrator's environment: ssh's keys and agent, and proxies."""
_BRANCHES_AND_TAGS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*")


class RepoError(Exception):
    """A task's repository cannot be used: unreachable, or no such commit or ref."""


def public_url(url: str) -> str:
    """`url` without its user and password: what names, logs and errors may show."""
    if "://" not in url:
        return url.split("@", 1)[-1]  # scp-like user@host:path
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()


def mirror_name(url: str) -> str:
    """A file name for the mirror of `url`: readable, safe, and one per URL (a digest)."""
    public = public_url(url)
    place = public.split("://", 1)[-1].replace(":", "/")
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", place).removesuffix(".git").strip("._-")[:80]
    digest = hashlib.sha256(public.encode()).hexdigest()[:12]
    return f"{slug or 'repo'}-{digest}.git"


@dataclass(frozen=True)
class Mirrors:
    """The data root's mirrors and exported trees."""

    root: DataRoot
    fetch_timeout_s: float = FETCH_TIMEOUT_S

    def mirror(self, url: str) -> Path:
        return self.root.task_mirrors / mirror_name(url)

    def resolve(self, url: str, commit: str | None = None, ref: str | None = None) -> str:
        """The full id of `commit` (or of `ref`'s commit) in `url`'s mirror, fetching what is
        missing (a ref is always fetched: it moves); the commit is pinned in the mirror."""
        with self._locked(url) as mirror:
            if commit is not None:
                full = self._commit(mirror, commit)
                if full is None:
                    self._fetch(mirror, url)
                    full = self._commit(mirror, commit)
                if full is None and len(commit) in (40, 64):
                    # Not on a branch or tag: servers that allow it hand out a commit by id.
                    with contextlib.suppress(RepoError):
                        self._fetch(mirror, url, f"{commit}:{PIN}{commit}")
                    full = self._commit(mirror, commit)
                if full is None:
                    raise RepoError(
                        f"commit {commit} is not in {public_url(url)} "
                        "(fetched its branches and tags)"
                    )
            elif ref is not None:
                self._fetch(mirror, url)
                full = self._ref(mirror, ref)
                if full is None:
                    raise RepoError(f"{public_url(url)} has no branch or tag {ref!r}")
            else:
                raise RepoError(f"{public_url(url)}: a commit or a ref is needed")
            _git(mirror, "update-ref", f"{PIN}{full}", full)
            return full

    def tree(self, url: str, commit: str) -> Path:
        """The folder holding `commit`'s files (no `.git`), exported once and then reused."""
        mirror = self.mirror(url)
        full = (
            self._commit(mirror, commit)
            if mirror.is_dir() and re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit)
            else None
        ) or self.resolve(url, commit=commit)
        dest = self.root.task_trees / mirror.name.removesuffix(".git") / full
        if dest.is_dir():
            return dest
        DataRoot.ensure(dest.parent)
        with exclusive(dest.with_name(f"{full}.lock")):
            if dest.is_dir():
                return dest
            partial = dest.with_name(f"{full}.partial")
            index = dest.with_name(f"{full}.index")
            if partial.exists():  # an interrupted export's
                shutil.rmtree(partial)
            index.unlink(missing_ok=True)
            partial.mkdir()
            try:
                # A private index; the mirror's info/attributes neutralise the tree's own
                # .gitattributes (no filter, no eol conversion): the files as committed.
                env = {"GIT_INDEX_FILE": str(index)}
                _git(mirror, "read-tree", full, env=env)
                _git(mirror, "checkout-index", "--all", "--force", env=env, work_tree=partial)
                os.replace(partial, dest)
            finally:
                index.unlink(missing_ok=True)
                if partial.is_dir():
                    shutil.rmtree(partial)
        return dest

    def patch_problem(self, url: str, commit: str, patch: str) -> str | None:
        """Why `patch` does not apply to `commit` of `url`'s mirror (git's words), or None.
        Checked against the commit's tree in a private index: no files are written."""
        mirror = self.mirror(url)
        with tempfile.TemporaryDirectory(prefix="autovibe-apply-") as tmp:
            index, diff = Path(tmp) / "index", Path(tmp) / "change.diff"
            diff.write_bytes(patch.encode(errors="surrogateescape"))
            env = {"GIT_INDEX_FILE": str(index)}
            _git(mirror, "read-tree", commit, env=env)
            try:
                _git(mirror, "apply", "--cached", "--check", str(diff), env=env)
            except WorkspaceError as exc:
                return " ".join((exc.output or str(exc)).replace(str(diff), "patch").split())
        return None

    @contextlib.contextmanager
    def _locked(self, url: str) -> Iterator[Path]:
        """`url`'s mirror, cloned first if there is none, held under its lock."""
        mirror = self.mirror(url)
        DataRoot.ensure(mirror.parent)
        with exclusive(mirror.with_suffix(".lock")):
            if not mirror.is_dir():
                partial = mirror.with_suffix(".partial")
                if partial.exists():
                    shutil.rmtree(partial)
                try:
                    _git(partial, "init", "--quiet", "--bare", "--template=", str(partial))
                    (partial / "info").mkdir(exist_ok=True)
                    (partial / "info" / "attributes").write_text(
                        NEUTRAL_ATTRIBUTES.rstrip("\n") + " -export-ignore -export-subst\n"
                    )
                    self._fetch(partial, url)
                    os.replace(partial, mirror)
                finally:
                    if partial.exists():
                        shutil.rmtree(partial)
            yield mirror

    def _fetch(self, mirror: Path, url: str, *refspecs: str) -> None:
        env = {k: v for k in _PASSED_ON if (v := os.environ.get(k)) is not None}
        env |= {
            "GIT_ALLOW_PROTOCOL": PROTOCOLS,
            # A stalled HTTP transfer (under 1 KB/s for a minute) is given up.
            "GIT_HTTP_LOW_SPEED_LIMIT": "1000",
            "GIT_HTTP_LOW_SPEED_TIME": "60",
        }
        env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
        try:
            _git(
                mirror, "fetch", "--quiet", "--atomic", "--no-tags", "--no-write-fetch-head",
                "--end-of-options", url, *(refspecs or _BRANCHES_AND_TAGS),
                env=env, timeout_s=self.fetch_timeout_s,
            )  # fmt: skip
        except WorkspaceError as exc:
            if isinstance(exc.__cause__, subprocess.TimeoutExpired):
                raise RepoError(
                    f"cannot fetch {public_url(url)}: not done within {self.fetch_timeout_s:g} s "
                    "(git and its transport were killed)"
                ) from None
            said = " ".join((exc.output or str(exc)).split()).replace(url, public_url(url))
            raise RepoError(f"cannot fetch {public_url(url)}: {said}") from None

    def _commit(self, mirror: Path, commit: str) -> str | None:
        try:
            out = _git(mirror, "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}")
        except WorkspaceError:
            return None
        return out.decode().strip()

    def _ref(self, mirror: Path, ref: str) -> str | None:
        names = [ref] if ref.startswith("refs/") else [f"refs/heads/{ref}", f"refs/tags/{ref}"]
        for name in names:
            if (full := self._commit(mirror, name)) is not None:
                return full
        return None


def _git(
    git_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    work_tree: Path | None = None,
    timeout_s: float | None = 120.0,
) -> bytes:
    return isolated_git(git_dir, *args, env=env, work_tree=work_tree, timeout_s=timeout_s)

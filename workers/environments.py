"""Task environments: a Debian root filesystem per set of packages, built once, shared.

A task that needs tools the host lacks names Debian packages (`environment: {packages: [...]}`
in the trial). The runner gets the environment's root before the agent starts (`ensure`): it is
built with mmdebstrap (the `essential` variant, the packages, and what the platform needs in it:
the libraries its interpreter links against and socat, from the host's Debian release so that
interpreter runs in it),
as a directory tree under `$AUTOVIBE_DATA/environments/<key>/root`, where `<key>` is a digest of
the recipe: the same packages are the same environment, shared by every assignment that names
them. The sandbox mounts that tree read-only in place of the host's system folders, with the
platform's code and interpreter, the workspace and the output folder bound in as usual
(`workers.sandbox`); the agent and the tests run with its tools.

A build is written beside its place and renamed in, under a lock (two runners wanting the same
environment build it once); its log and timing are kept in `build.log` and `manifest.json`. A
build that fails raises BuildFailed naming the packages and the log's last lines: the
assignment is an infrastructure failure, and `autovibe tasks validate` marks the task invalid.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from pydantic import BaseModel, Field

from common.locks import exclusive

MIRROR = "http://deb.debian.org/debian"
PLATFORM_PACKAGES = (
    "libbz2-1.0", "libcrypt1", "libexpat1", "libffi8", "liblzma5", "libncursesw6",
    "libreadline8", "libsqlite3-0", "libssl3", "libtirpc3", "libuuid1", "zlib1g",
    "ca-certificates", "socat",
)  # fmt: skip
"""What the platform needs inside the root: the libraries its interpreter and its standard
library's modules link against (besides libc), and socat, which bridges the proxy onto the
sandbox's loopback (`workers.sandbox_init`)."""
BUILD_TIMEOUT_S = 1800
PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.-]{1,62}$")
"""A Debian package name (Debian Policy 5.6.1), nothing mmdebstrap could read as an option."""


class BuildFailed(RuntimeError):
    """An environment could not be built; the message names the packages and the cause."""


class Recipe(BaseModel):
    """What an environment is made of; `key` names it."""

    packages: tuple[str, ...] = Field(min_length=1)
    suite: str
    """The host's Debian release (its interpreter must run in the root)."""

    def key(self) -> str:
        content = {
            "packages": sorted(set(self.packages)),
            "suite": self.suite,
            "base": sorted(PLATFORM_PACKAGES),
            "variant": "essential",
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def host_suite(os_release: Path = Path("/etc/os-release")) -> str:
    """The host's Debian codename (`bookworm`); BuildFailed off Debian."""
    try:
        fields = dict(
            line.split("=", 1) for line in os_release.read_text().splitlines() if "=" in line
        )
    except OSError as exc:
        raise BuildFailed(f"cannot read {os_release}: {exc}") from None
    if fields.get("ID", "").strip('"') != "debian" or not fields.get("VERSION_CODENAME"):
        raise BuildFailed(
            f"task environments are built from Debian packages on a Debian host; this host is "
            f"{fields.get('PRETTY_NAME', 'unknown').strip(chr(34))}"
        )
    return fields["VERSION_CODENAME"].strip('"')


def folder(data_root: Path, recipe: Recipe) -> Path:
    return data_root / "environments" / recipe.key()


def ensure(data_root: Path, packages: list[str], *, mirror: str = MIRROR) -> Path:
    """The root of the environment of `packages`, built now if it is not there yet."""
    bad = [p for p in packages if not PACKAGE.match(p)]
    if bad:
        raise BuildFailed(f"not Debian package names: {', '.join(map(repr, bad))}")
    recipe = Recipe(packages=tuple(packages), suite=host_suite())
    place = folder(data_root, recipe)
    root = place / "root"
    if (place / "manifest.json").exists():
        return root
    place.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with exclusive(place.with_name(f"{place.name}.lock")):
        if (place / "manifest.json").exists():
            return root
        _build(place, recipe, mirror)
    return root


def failed_build(place: Path, what: str) -> BuildFailed:
    """BuildFailed saying `what` and the last lines of the build's log, which is kept beside
    `place` (`<key>.failed.log`); the partial build is removed."""
    partial = place.with_name(f"{place.name}.partial")
    log = partial / "build.log"
    tail = log.read_text(errors="replace").splitlines()[-8:]
    failed = place.with_name(f"{place.name}.failed.log")
    shutil.copyfile(log, failed)
    shutil.rmtree(partial, ignore_errors=True)
    return BuildFailed(f"{what}; see {failed}:\n" + "\n".join(f"  | {line}" for line in tail))


def _build(place: Path, recipe: Recipe, mirror: str) -> None:
    partial = place.with_name(f"{place.name}.partial")
    if partial.exists():  # an interrupted build's
        shutil.rmtree(partial)
    partial.mkdir()
    log = partial / "build.log"
    packages = sorted({*recipe.packages, *PLATFORM_PACKAGES})
    argv = [
        "mmdebstrap", "--variant=essential", "--mode=auto", "--format=directory",
        f"--include={','.join(packages)}",
        "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        recipe.suite, str(partial / "root"), mirror,
    ]  # fmt: skip
    if shutil.which("mmdebstrap") is None:
        raise BuildFailed("mmdebstrap is not installed (Debian package mmdebstrap)")
    started = time.monotonic()
    with log.open("wb") as out:
        try:
            done = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                timeout=BUILD_TIMEOUT_S, check=False,
            )  # fmt: skip
            code: int | None = done.returncode
        except subprocess.TimeoutExpired:
            code = None
    build_s = round(time.monotonic() - started, 1)
    if code != 0:
        how = f"exit {code}" if code is not None else f"over {BUILD_TIMEOUT_S} s"
        raise failed_build(
            place, f"the environment of {', '.join(recipe.packages)} could not be built ({how})"
        )
    manifest = {
        "key": recipe.key(),
        "packages": list(recipe.packages),
        "suite": recipe.suite,
        "built_at": time.time(),
        "build_s": build_s,
        "argv": argv,
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    partial.rename(place)

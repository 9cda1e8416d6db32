"""Agents installed into the data root: `<data>/agents/<name>/`, one folder per agent.

PyPI agents get their own virtual environment (`uv venv` + `uv pip install`) under `venv/`,
npm agents an npm prefix (`npm install --prefix <dir>`); `installed.json`, written last, says
what was installed and its version, so a folder without it is a failed or partial install.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from contracts.settings import Settings

INSTALLED = "installed.json"
INSTALL_TIMEOUT_S = 900
CURSOR_ENV = "AUTOVIBE_CURSOR_AGENT"
"""Path of the `cursor-agent` binary; it cannot be installed by us (closed download)."""


@dataclass(frozen=True)
class Package:
    """Where an agent comes from and which program of it is run."""

    registry: Literal["pypi", "npm"]
    name: str
    """Distribution name on PyPI, package name on npm."""
    program: str
    """Executable the package installs (`venv/bin/<p>`, `node_modules/.bin/<p>`)."""


PACKAGES: dict[str, Package] = {
    "mini-swe-agent": Package("pypi", "mini-swe-agent", "mini"),
    "aider": Package("pypi", "aider-chat", "aider"),
    "claude-code": Package("npm", "@anthropic-ai/claude-code", "claude"),
    "qwen-code": Package("npm", "@qwen-code/qwen-code", "qwen"),
}
"""Agents `autovibe agents install` knows how to install."""
BUNDLED = ("builtin", "command")
"""Agents that ship with autovibe: always installed (`command` runs the task's own program)."""


class InstallError(RuntimeError):
    """An install command failed; the message has the command and the end of its output."""


@dataclass(frozen=True)
class Installed:
    name: str
    package: str
    registry: str
    version: str
    installed_at: float
    path: Path


def data_root(root: Path | None = None) -> Path:
    return (root if root is not None else Settings().data).resolve()


def agent_dir(name: str, root: Path | None = None) -> Path:
    """`<data>/agents/<name>/`."""
    return data_root(root) / "agents" / name


def executable(name: str, root: Path | None = None) -> Path:
    """The program that runs an installed agent (it may not exist yet)."""
    if name == "cursor-cli":
        return cursor_binary()
    package = PACKAGES[name]
    folder = agent_dir(name, root)
    if package.registry == "pypi":
        return folder / "venv" / "bin" / package.program
    return folder / "node_modules" / ".bin" / package.program


def cursor_binary() -> Path:
    """`$AUTOVIBE_CURSOR_AGENT`, else `cursor-agent` on PATH, else where its installer puts it."""
    configured = os.environ.get(CURSOR_ENV)
    if configured:
        return Path(configured)
    found = shutil.which("cursor-agent")
    return Path(found) if found else Path.home() / ".local" / "bin" / "cursor-agent"


def read_installed(name: str, root: Path | None = None) -> Installed | None:
    path = agent_dir(name, root) / INSTALLED
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return Installed(
        name=name,
        package=str(data["package"]),
        registry=str(data["registry"]),
        version=str(data["version"]),
        installed_at=float(data["installed_at"]),
        path=path.parent,
    )


def is_installed(name: str, root: Path | None = None) -> bool:
    """Whether a trial may name this agent on this machine."""
    if name in BUNDLED:
        return True
    if name == "cursor-cli":
        return os.access(cursor_binary(), os.X_OK)
    return read_installed(name, root) is not None and executable(name, root).exists()


def install_hint(name: str) -> str:
    """What to do so that `is_installed(name)` holds."""
    if name == "cursor-cli":
        return (
            f"cursor-cli needs the `cursor-agent` binary: install it from cursor.com/cli and set "
            f"${CURSOR_ENV} to its path (or put it on PATH)"
        )
    if name in PACKAGES:
        return f"agent {name!r} is not installed: run `autovibe agents install {name}`"
    return f"unknown agent {name!r}"


def installed_versions(root: Path | None = None) -> dict[str, str]:
    """Every agent usable here -> its version; what `autovibe agents ls` shows."""
    out = {}
    for name in sorted(PACKAGES):
        found = read_installed(name, root)
        if found is not None and executable(name, root).exists():
            out[name] = found.version
    if is_installed("cursor-cli"):
        out["cursor-cli"] = cursor_version()
    return out


def cursor_version() -> str:
    try:
        proc = subprocess.run(
            [str(cursor_binary()), "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return proc.stdout.strip() or "unknown"


def uv_command() -> list[str]:
    found = shutil.which("uv")
    return [found] if found else [sys.executable, "-m", "uv"]


def install(name: str, root: Path | None = None) -> Installed:
    """Install (or reinstall) an agent into the data root; raises `InstallError` on failure."""
    if name not in PACKAGES:
        raise InstallError(install_hint(name) if name == "cursor-cli" else _not_installable(name))
    package = PACKAGES[name]
    folder = agent_dir(name, root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / INSTALLED).unlink(missing_ok=True)
    if package.registry == "pypi":
        python = folder / "venv" / "bin" / "python"
        if not python.exists():
            _run([*uv_command(), "venv", "--quiet", str(folder / "venv")])
        _run([*uv_command(), "pip", "install", "--python", str(python), package.name])
        shown = _run([*uv_command(), "pip", "show", "--python", str(python), package.name])
        match = re.search(r"^Version:\s*(\S+)", shown, re.MULTILINE)
        version = match.group(1) if match else "unknown"
    else:
        npm = shutil.which("npm")
        if npm is None:
            raise InstallError(f"installing {name} needs npm (Debian package `npm`)")
        _run([npm, "install", "--no-fund", "--no-audit", "--prefix", str(folder), package.name])
        manifest = folder / "node_modules" / package.name / "package.json"
        version = str(json.loads(manifest.read_text()).get("version", "unknown"))
    if not executable(name, root).exists():
        raise InstallError(f"{package.name} installed but {executable(name, root)} is missing")
    record = {
        "name": name,
        "package": package.name,
        "registry": package.registry,
        "version": version,
        "installed_at": time.time(),
    }
    tmp = folder / (INSTALLED + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, folder / INSTALLED)
    found = read_installed(name, root)
    assert found is not None
    return found


def _not_installable(name: str) -> str:
    if name in BUNDLED:
        return f"agent {name!r} ships with autovibe; nothing to install"
    return f"unknown agent {name!r}; installable: {', '.join(sorted(PACKAGES))}"


def _run(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"`{' '.join(argv)}` failed: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise InstallError(f"`{' '.join(argv)}` exited with {proc.returncode}:\n{tail}")
    return proc.stdout

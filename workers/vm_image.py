"""Worker VM images: a Debian root built with mmdebstrap, packed as a qcow2 disk beside its
kernel and initrd, cached by the content of its recipe.

No loop device and no mount: mmdebstrap writes a directory tree, `mkfs.ext4 -d` makes a
filesystem image from it (ownership and modes kept), `qemu-img convert` turns that into qcow2.
The disk has no partition table and no boot loader: libvirt boots the extracted kernel and
initrd directly (`root=/dev/vda`), and cloud-init grows the filesystem to the VM's disk.

Two layers: the Debian tree (cached by the packages and files that make it, under `trees/`)
and the autovibe worker on top of it in `/opt/autovibe`: our packages' source and a
`.venv` with the runner's dependencies at the versions of uv.lock, installed by uv for the
image's Python without running it. The image key covers both, so a change of our code makes a
new image in seconds (a hard-linked copy of the cached tree, the layer, mkfs), not a new
mmdebstrap run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from pydantic import BaseModel, ConfigDict, Field

from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT

IMAGE_PROJECT = "_platform"
"""Images are the platform's, not a project's: `checkpoints/_platform/vm-images/<key>/`."""
CMDLINE = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
"""Kernel command line of the image's disk: the ext4 root is the whole virtio disk."""
PACKAGES = (
    # boot and first boot
    "systemd-sysv", "udev", "dbus", "linux-image-cloud-amd64", "initramfs-tools", "e2fsprogs",
    "cloud-init", "ifupdown", "isc-dhcp-client", "netbase", "openssh-server", "sudo",
    # what the runner and the agents use
    "ca-certificates", "curl", "git", "tmux", "python3", "python3-venv", "bubblewrap", "socat",
    "nodejs",
    # the agents' desktop, behind a VNC server on localhost
    "tigervnc-standalone-server", "openbox", "xterm",
)  # fmt: skip
FILES = {
    "etc/fstab": "/dev/vda / ext4 rw,discard,errors=remount-ro 0 1\n",
    # The seed is the only datasource: cloud-init does not probe the network for others.
    "etc/cloud/cloud.cfg.d/90-autovibe.cfg": (
        "datasource_list: [NoCloud, None]\n"
        "locale: C.UTF-8\n"  # the only locale built into libc; no locales package needed
    ),
    "etc/hostname": "",
}
"""Files written into the tree after mmdebstrap, by path relative to its root."""
DROPPED = ("etc/ssh/ssh_host_*", "var/lib/apt/lists/*", "var/cache/apt/*.bin")
"""Removed from the tree: host keys are made per VM on first boot (cloud-init), never shared."""
DPKG_EXCLUDES = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")
INSTALL_DIR = "opt/autovibe"
"""Where the worker layer puts autovibe in the image (`VmSpec.install_dir`): our packages, and
`.venv` whose `bin/python` is what the worker unit and the `vm` driver run."""
WORKER_REQUIREMENTS = (
    "httpx",
    "pydantic",
    "pydantic-settings",
    "pyyaml",
    "pytest",
    "rich",
    "click",
    "cryptography",
)
"""What the runner, the sandbox helpers, the built-in agent and grading import beyond the
standard library (cryptography: the secret store read to redact what the agent left); with
their dependencies, at uv.lock's versions."""
WORKER_PYTHON = "3.11"
"""The image's Python (Debian bookworm's python3), which the worker layer is installed for."""


class ImageError(Exception):
    """An image could not be built: a tool missing or failing, named with its output."""


class ImageRecipe(BaseModel):
    """What an image is made of; its key (a digest of everything but the mirror) names it."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    suite: str = "bookworm"
    """Debian release."""
    mirror: str = "http://deb.debian.org/debian"
    """Debian mirror mmdebstrap fetches from (not part of the key: the same packages)."""
    packages: tuple[str, ...] = PACKAGES
    """Debian packages on top of the `apt` variant (Essential and apt)."""
    size_gb: int = Field(default=4, ge=1)
    """Size of the ext4 filesystem; a VM's disk is larger and cloud-init grows it at boot."""
    files: dict[str, str] = Field(default_factory=lambda: dict(FILES))
    """Files written into the tree, by relative path."""
    cmdline: str = CMDLINE
    worker: bool = True
    """Put the autovibe worker in `/opt/autovibe` (our code and the runner's dependencies)."""

    def tree_key(self) -> str:
        """The Debian tree's key: what mmdebstrap and `finish_tree` make it from."""
        content = self.model_dump(mode="json", exclude={"mirror", "worker", "size_gb", "cmdline"})
        content["packages"] = sorted(set(self.packages))
        content["dropped"] = list(DROPPED)
        content["dpkg_excludes"] = list(DPKG_EXCLUDES)
        return _digest(content)

    def key(self) -> str:
        content: dict[str, object] = {
            "tree": self.tree_key(),
            "size_gb": self.size_gb,
            "cmdline": self.cmdline,
        }
        if self.worker:
            content["worker"] = {"pins": worker_pins(), "source": source_digest()}
        return _digest(content)


def _digest(content: object) -> str:
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the worker layer ---------------------------------------------------------------------------


def source_packages(root: Path = PROJECT_ROOT) -> list[str]:
    """Our packages, as the wheel lists them (pyproject.toml)."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    return list(project["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"])


def _source_files(root: Path = PROJECT_ROOT) -> Iterable[Path]:
    for package in source_packages(root):
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield path


def source_digest(root: Path = PROJECT_ROOT) -> str:
    """A digest of our packages' files as they are in the checkout (what the layer copies)."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def worker_pins(lock: Path = PROJECT_ROOT / "uv.lock") -> list[str]:
    """`name==version` of `WORKER_REQUIREMENTS` and everything they need on Linux under the
    image's Python, read from uv.lock (markers evaluated, extras followed)."""
    packages = {p["name"]: p for p in tomllib.loads(lock.read_text())["package"]}
    environment = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                   "python_version": WORKER_PYTHON, "python_full_version": WORKER_PYTHON + ".2",
                   "platform_machine": "x86_64", "implementation_name": "cpython",
                   "platform_python_implementation": "CPython"}  # fmt: skip

    def wanted(dep: dict[str, Any]) -> bool:
        marker = dep.get("marker")
        return marker is None or Marker(str(marker)).evaluate({**environment, "extra": ""})

    todo: list[dict[str, Any]] = [{"name": name} for name in WORKER_REQUIREMENTS]
    seen: set[str] = set()
    done: set[tuple[str, str]] = set()
    while todo:
        dep = todo.pop()
        name = str(dep["name"])
        package = packages[name]
        if name not in seen:
            seen.add(name)
            todo += [d for d in package.get("dependencies", []) if wanted(d)]
        for extra in dep.get("extra") or []:
            if (name, extra) not in done:
                done.add((name, extra))
                optional = package.get("optional-dependencies", {}).get(extra, [])
                todo += [d for d in optional if wanted(d)]
    return sorted(f"{name}=={packages[name]['version']}" for name in seen)


def add_worker(tree: Path, log: Path) -> None:
    """Put the worker layer into `tree`: our source, a venv of the image's python3 with the
    pinned dependencies (uv, for that Python and platform, without running it), bytecode
    compiled by this interpreter (same Python minor version: the same bytecode)."""
    install = tree / INSTALL_DIR
    for path in _source_files():
        target = install / path.relative_to(PROJECT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    venv = install / ".venv"
    site = venv / "lib" / f"python{WORKER_PYTHON}" / "site-packages"
    site.mkdir(parents=True)
    (venv / "bin").mkdir()
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "pyvenv.cfg").write_text(
        f"home = /usr/bin\ninclude-system-site-packages = false\nversion = {WORKER_PYTHON}\n"
    )
    (site / "autovibe.pth").write_text(f"/{INSTALL_DIR}\n")  # our packages, as `uv sync` does
    pins = log.parent / "worker-requirements.txt"
    pins.write_text("\n".join(worker_pins()) + "\n")
    from workers.agents.install import uv_command

    argv = [*uv_command(), "pip", "install", "--quiet", "--no-deps", "--target", str(site),
            "--python-version", WORKER_PYTHON, "--python-platform", "x86_64-manylinux_2_36",
            "-r", str(pins)]  # fmt: skip
    try:  # from uv's cache first; a registry only for what it lacks
        _run([*argv, "--offline"], log)
    except ImageError:
        _run(argv, log)
    _run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(tree), "-p", "/",
          str(install)], log)  # fmt: skip


@dataclass(frozen=True)
class VmImage:
    """A built image: qcow2 root disk, kernel, initrd, and the manifest that records it."""

    folder: Path

    @property
    def disk(self) -> Path:
        return self.folder / "root.qcow2"

    @property
    def kernel(self) -> Path:
        return self.folder / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.folder / "initrd.img"

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def manifest(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.manifest_path.read_text())
        return loaded

    @property
    def cmdline(self) -> str:
        return str(self.manifest()["cmdline"])

    def complete(self) -> bool:
        return all(p.is_file() for p in (self.disk, self.kernel, self.initrd, self.manifest_path))


def images_dir(root: DataRoot) -> Path:
    return root.root / "checkpoints" / IMAGE_PROJECT / "vm-images"


def image_for(root: DataRoot, recipe: ImageRecipe) -> VmImage:
    """Where the image of `recipe` lives (built or not)."""
    return VmImage(images_dir(root) / recipe.key())


def bootstrap_argv(recipe: ImageRecipe, tree: Path) -> list[str]:
    """mmdebstrap writing the root as a directory tree (no image, no mount)."""
    return [
        "mmdebstrap", "--variant=apt", "--mode=auto", "--format=directory",
        f"--include={','.join(recipe.packages)}",
        *(f"--dpkgopt=path-exclude={pattern}" for pattern in DPKG_EXCLUDES),
        recipe.suite, str(tree), recipe.mirror,
    ]  # fmt: skip


def pack_argv(tree: Path, raw: Path, disk: Path, size_gb: int) -> list[list[str]]:
    """The tree into an ext4 filesystem image, then into qcow2: no loop device, no mount."""
    return [
        ["mkfs.ext4", "-q", "-F", "-L", "autovibe-root", "-d", str(tree), str(raw), f"{size_gb}G"],
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
    ]


def _run(argv: list[str], log: Path) -> None:
    if shutil.which(argv[0]) is None and shutil.which(argv[0], path="/usr/sbin:/sbin") is None:
        raise ImageError(f"{argv[0]} not found: install it (make system-deps does)")
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
        proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise ImageError(
            f"{argv[0]} failed (exit {proc.returncode}); end of {log}:\n" + "\n".join(tail)
        )


def finish_tree(recipe: ImageRecipe, tree: Path) -> tuple[Path, Path]:
    """Write the recipe's files, drop what a VM must not share, and return the tree's kernel
    and initrd."""
    for rel, text in recipe.files.items():
        path = tree / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pattern in DROPPED:
        for path in tree.glob(pattern):
            if path.is_file() or path.is_symlink():
                path.unlink()
    return boot_files(tree)


def boot_files(tree: Path) -> tuple[Path, Path]:
    """The tree's kernel and initrd (the newest of each)."""
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise ImageError(f"{tree}/boot holds no kernel and initrd: is a linux-image package in?")
    return kernels[-1], initrds[-1]


def _versions(tree: Path) -> dict[str, str]:
    proc = subprocess.run(
        ["dpkg-query", f"--admindir={tree}/var/lib/dpkg", "-W", "-f", "${Package}=${Version}\n"],
        capture_output=True,
        text=True,
        check=False,
    )
    pairs = (line.partition("=") for line in proc.stdout.splitlines())
    return {name: version for name, _, version in pairs if name}


def trees_dir(root: DataRoot) -> Path:
    return images_dir(root) / "trees"


def debian_tree(recipe: ImageRecipe, root: DataRoot, log: Path) -> tuple[Path, dict[str, float]]:
    """The recipe's Debian tree (mmdebstrap, then `finish_tree`), built once per `tree_key`
    beside its place and renamed in; the seconds it took when built now."""
    tree = trees_dir(root) / recipe.tree_key()
    if (tree / "boot").is_dir():
        return tree, {}
    part = DataRoot.ensure(trees_dir(root)) / f".{recipe.tree_key()}-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    try:
        start = time.monotonic()
        _run(bootstrap_argv(recipe, part), log)
        finish_tree(recipe, part)
        bootstrap_s = round(time.monotonic() - start, 1)
        shutil.rmtree(tree, ignore_errors=True)
        part.rename(tree)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    return tree, {"bootstrap_s": bootstrap_s}


def build(recipe: ImageRecipe, root: DataRoot, force: bool = False) -> tuple[VmImage, bool]:
    """The image of `recipe`, built unless the cache holds it; True when it was built now.

    Built in a folder beside its place and renamed in, so a failed or interrupted build
    leaves no half image under the key."""
    image = image_for(root, recipe)
    if image.complete() and not force:
        return image, False
    work = DataRoot.ensure(images_dir(root)) / f".build-{recipe.key()}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    log = work / "build.log"
    tree, raw = work / "tree", work / "root.raw"
    try:
        if force:
            shutil.rmtree(trees_dir(root) / recipe.tree_key(), ignore_errors=True)
        cached, timings = debian_tree(recipe, root, log)
        start = time.monotonic()
        # Hard links: the layer only adds files (under /opt), never writes one of the tree's.
        _run(["cp", "-al", str(cached), str(tree)], log)
        kernel, initrd = boot_files(tree)
        if recipe.worker:
            add_worker(tree, log)
            timings["worker_s"] = round(time.monotonic() - start, 1)
        shutil.copy2(kernel, work / "vmlinuz")
        shutil.copy2(initrd, work / "initrd.img")
        versions = _versions(tree)
        start = time.monotonic()
        for argv in pack_argv(tree, raw, work / "root.qcow2", recipe.size_gb):
            _run(argv, log)
        timings["pack_s"] = round(time.monotonic() - start, 1)
        shutil.rmtree(tree)
        raw.unlink()
        manifest = {
            "key": recipe.key(),
            "tree": recipe.tree_key(),
            "recipe": recipe.model_dump(mode="json"),
            "cmdline": recipe.cmdline,
            "kernel": kernel.name,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "timings": timings,
            "disk_bytes": (work / "root.qcow2").stat().st_size,
            "packages": versions,
            "worker": {"pins": worker_pins(), "source": source_digest()} if recipe.worker else None,
        }
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        if image.folder.exists():
            shutil.rmtree(image.folder)
        work.rename(image.folder)
    except BaseException:
        shutil.rmtree(tree, ignore_errors=True)  # the log stays, to read why
        raise
    return image, True

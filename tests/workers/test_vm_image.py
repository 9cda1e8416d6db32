"""Worker VM images: the recipe's key, and packing a tree into qcow2 with the real tools
(mkfs.ext4 -d, qemu-img) without loop devices or mounts. The full build (mmdebstrap from a
Debian mirror) runs in tests/workers/test_vm_boot.py (marker `vm`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from contracts.dataroot import DataRoot
from contracts.settings import PROJECT_ROOT
from workers import vm_image


def test_the_key_follows_the_content_not_the_mirror() -> None:
    recipe = vm_image.ImageRecipe()
    assert recipe.key() == vm_image.ImageRecipe().key()
    assert recipe.key() == vm_image.ImageRecipe(mirror="http://mirror.example/debian").key()
    reordered = vm_image.ImageRecipe(packages=tuple(reversed(vm_image.PACKAGES)))
    assert reordered.key() == recipe.key()
    assert vm_image.ImageRecipe(packages=(*vm_image.PACKAGES, "htop")).key() != recipe.key()
    assert vm_image.ImageRecipe(size_gb=8).key() != recipe.key()
    files = {**vm_image.FILES, "etc/motd": "hi\n"}
    assert vm_image.ImageRecipe(files=files).key() != recipe.key()


def test_the_plan_makes_a_tree_then_files_never_a_device(tmp_path: Path) -> None:
    recipe = vm_image.ImageRecipe()
    argv = vm_image.bootstrap_argv(recipe, tmp_path / "tree")
    assert argv[:4] == ["mmdebstrap", "--variant=apt", "--mode=auto", "--format=directory"]
    assert argv[-3:] == ["bookworm", str(tmp_path / "tree"), "http://deb.debian.org/debian"]
    included = next(a for a in argv if a.startswith("--include=")).split("=", 1)[1].split(",")
    for needed in ("cloud-init", "openssh-server", "tigervnc-standalone-server", "python3",
                   "nodejs", "bubblewrap", "linux-image-cloud-amd64"):  # fmt: skip
        assert needed in included
    steps = [argv, *vm_image.pack_argv(tmp_path / "t", tmp_path / "r", tmp_path / "d", 4)]
    words = {word for step in steps for word in step}
    assert not words & {"mount", "losetup", "kpartx", "qemu-nbd", "chroot"}
    assert [step[0] for step in steps] == ["mmdebstrap", "mkfs.ext4", "qemu-img"]


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "boot").mkdir(parents=True)
    (tree / "boot" / "vmlinuz-6.1.0-x").write_bytes(b"kernel")
    (tree / "boot" / "initrd.img-6.1.0-x").write_bytes(b"initrd")
    (tree / "etc" / "ssh").mkdir(parents=True)
    (tree / "etc" / "ssh" / "ssh_host_ed25519_key").write_text("private\n")
    (tree / "etc" / "ssh" / "sshd_config").write_text("PasswordAuthentication no\n")
    secret = tree / "etc" / "shadow"
    secret.write_text("root:*:1::::::\n")
    secret.chmod(0o640)
    (tree / "etc" / "localtime").symlink_to("/usr/share/zoneinfo/UTC")
    return tree


def _debugfs(image: Path, command: str) -> str:
    debugfs = shutil.which("debugfs") or "/usr/sbin/debugfs"
    proc = subprocess.run(
        [debugfs, "-R", command, str(image)], capture_output=True, text=True, check=True
    )
    return proc.stdout


def test_a_tree_packs_into_qcow2_with_its_files_modes_and_links(tmp_path: Path) -> None:
    recipe = vm_image.ImageRecipe(size_gb=1)
    tree = _tree(tmp_path)
    kernel, initrd = vm_image.finish_tree(recipe, tree)
    assert (kernel.name, initrd.name) == ("vmlinuz-6.1.0-x", "initrd.img-6.1.0-x")
    assert not (tree / "etc" / "ssh" / "ssh_host_ed25519_key").exists()  # made per VM
    assert (tree / "etc" / "ssh" / "sshd_config").exists()
    raw, disk = tmp_path / "root.raw", tmp_path / "root.qcow2"
    for argv in vm_image.pack_argv(tree, raw, disk, recipe.size_gb):
        subprocess.run(argv, check=True, capture_output=True, env={**os.environ,
                       "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"})  # fmt: skip
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", str(disk)],
            capture_output=True, text=True, check=True,
        ).stdout
    )  # fmt: skip
    assert info["format"] == "qcow2" and info["virtual-size"] == 1 << 30
    back = tmp_path / "back.raw"  # read the qcow2 back, as a VM would see its disk
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(back)], check=True)
    assert _debugfs(back, "cat /etc/fstab") == vm_image.FILES["etc/fstab"]
    assert "datasource_list: [NoCloud, None]" in _debugfs(
        back, "cat /etc/cloud/cloud.cfg.d/90-autovibe.cfg"
    )
    shadow = _debugfs(back, "stat /etc/shadow")
    assert "Mode:  0640" in shadow and "User:     0" in shadow
    assert "/usr/share/zoneinfo/UTC" in _debugfs(back, "stat /etc/localtime")
    assert "ssh_host_ed25519_key" not in _debugfs(back, "ls /etc/ssh")
    assert (
        "autovibe-root"
        in subprocess.run(
            ["blkid", "-o", "value", "-s", "LABEL", str(back)], capture_output=True, text=True
        ).stdout
    )


def test_a_cached_image_is_used_and_a_failed_build_leaves_nothing(tmp_path: Path) -> None:
    root = DataRoot.at(tmp_path / "data")
    unreachable = vm_image.ImageRecipe(mirror=f"file://{tmp_path}/no-mirror", size_gb=1)
    with pytest.raises(vm_image.ImageError, match=r"mmdebstrap failed \(exit \d+\)"):
        vm_image.build(unreachable, root)
    assert not vm_image.image_for(root, unreachable).folder.exists()
    # A complete image under the key is what build returns, without building.
    image = vm_image.image_for(root, unreachable)
    image.folder.mkdir(parents=True)
    for path in (image.disk, image.kernel, image.initrd):
        path.write_bytes(b"x")
    image.manifest_path.write_text(json.dumps({"cmdline": vm_image.CMDLINE}))
    again, built = vm_image.build(unreachable, root)
    assert (again, built) == (image, False) and again.cmdline == vm_image.CMDLINE
    assert image.folder.parent == root.root / "checkpoints" / "_platform" / "vm-images"


def test_the_key_follows_our_code_and_pins_and_the_tree_only_its_packages(tmp_path: Path) -> None:
    recipe = vm_image.ImageRecipe()
    assert recipe.key() != vm_image.ImageRecipe(worker=False).key()
    assert recipe.tree_key() == vm_image.ImageRecipe(worker=False, size_gb=8).tree_key()
    assert (
        recipe.tree_key() != vm_image.ImageRecipe(packages=(*vm_image.PACKAGES, "htop")).tree_key()
    )
    checkout = tmp_path / "checkout"
    (checkout / "pkg" / "__pycache__").mkdir(parents=True)
    (checkout / "pyproject.toml").write_text(
        '[tool.hatch.build.targets.wheel]\npackages = ["pkg"]\n'
    )
    (checkout / "pkg" / "a.py").write_text("x = 1\n")
    before = vm_image.source_digest(checkout)
    (checkout / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert vm_image.source_digest(checkout) == before  # caches are not source
    (checkout / "pkg" / "a.py").write_text("x = 2\n")
    assert vm_image.source_digest(checkout) != before
    pins = dict(pin.split("==") for pin in vm_image.worker_pins())
    assert {"pydantic", "pydantic-core", "pytest", "httpx", "cryptography", "cffi"} <= set(pins)
    assert "colorama" not in pins  # pytest needs it on Windows only
    assert not {"mitmproxy", "ray", "llama-cpp-python"} & set(pins)  # the host's, not a worker's


@pytest.mark.slow
def test_the_worker_layer_is_a_venv_of_the_images_python_with_all_the_runner_needs(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "tree"
    (tmp_path / "logs").mkdir()
    vm_image.add_worker(tree, tmp_path / "logs" / "build.log")
    install = tree / vm_image.INSTALL_DIR
    venv = install / ".venv"
    assert os.readlink(venv / "bin" / "python3") == "/usr/bin/python3"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    site = venv / "lib" / f"python{vm_image.WORKER_PYTHON}" / "site-packages"
    assert (site / "autovibe.pth").read_text() == "/opt/autovibe\n"
    runner = install / "workers" / "runner.py"
    assert runner.read_bytes() == (PROJECT_ROOT / "workers" / "runner.py").read_bytes()
    assert list((install / "workers" / "__pycache__").glob("runner.cpython-311.pyc"))
    # Everything the runner, its helpers, the built-in agent and grading import is there: an
    # interpreter with no site-packages of its own imports them from the layer alone.
    code = (
        f"import sys; sys.path[:0] = [{str(install)!r}, {str(site)!r}]; "
        "import workers.runner, workers.agents.builtin, workers.sandbox_init, "
        "workers.sandbox_user, secretstore.file, pytest, common.logs; print('ok')"
    )
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True)
    assert proc.stdout == "ok\n", proc.stderr

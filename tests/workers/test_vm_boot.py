"""A worker VM booted for real: the image built (or taken from the cache), the domain defined in
libvirt from the rendered domain.xml, cloud-init waited for, then checked over SSH as the
operator: the proxy's CA trusted, no way out but the proxy, a request through the proxy
captured under the VM's machine identity, the desktop's VNC screenshot a PNG.

Marker `vm` (with `slow`), left out of `make test` (`make test-vm` runs it): 3 min 41 s with the
image cached under TCG on 2 shared cores (vm up 124 s, of which cloud-init 118 s), 5 min 40 s
at load 5 (cloud-init 226 s), about 90 s more when the image is built first. Needs root
(libvirt's qemu:///system, mmdebstrap) and a Debian mirror for the first build.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import Proxy, Upstream, metering_proxy, serve

from contracts.credentials import proxy_url
from contracts.dataroot import DataRoot
from workers import vm_host, vm_image

pytestmark = [pytest.mark.vm, pytest.mark.slow]

NAME = "autovibe-test-vm"
NETWORK, HOST_CIDR = "autovibe-test", "192.168.151.1/24"
HOST = HOST_CIDR.split("/")[0]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "autovibe" / "vm-data"
"""The data root of these tests: the built image stays cached here between sessions."""
AUTOVIBE = str(Path(sys.executable).parent / "autovibe")


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "AUTOVIBE_DATA": str(CACHE), "COLUMNS": "200"}
    return subprocess.run(
        [AUTOVIBE, *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


@pytest.fixture(scope="module")
def libvirt() -> None:
    """libvirtd (and virtlogd) running: started here when this host has no service manager."""
    assert os.geteuid() == 0, "the VM tests need root: libvirt qemu:///system and mmdebstrap"
    for tool in ("virsh", "mmdebstrap", "qemu-system-x86_64", "genisoimage", "vncsnapshot"):
        assert shutil.which(tool), f"{tool} not found: make system-deps installs it"
    if vm_host.virsh("version", check=False).returncode != 0:
        subprocess.run(["virtlogd", "-d"], check=True)
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + 30
        while vm_host.virsh("version", check=False).returncode != 0:
            assert time.monotonic() < deadline, "libvirtd did not start"
            time.sleep(0.5)
    CACHE.mkdir(parents=True, exist_ok=True)
    vm_host.ensure_network(NETWORK, HOST_CIDR, CACHE)  # the proxy binds to its host address


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    yield from serve()


@pytest.fixture(scope="module")
def proxy(
    libvirt: None, tmp_path_factory: pytest.TempPathFactory, upstream: Upstream
) -> Iterator[Proxy]:
    """The real proxy listening on the host's address of the VM network."""
    yield from metering_proxy(tmp_path_factory, upstream.port, host=HOST)


@pytest.fixture(scope="module")
def booted(proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, float]]:
    """The VM up, cloud-init done; the figures measured on the way."""
    keys = tmp_path_factory.mktemp("keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / "op")],
                   check=True)  # fmt: skip
    identity = proxy.identity("a-vm", machine="m1")
    variables = {
        "operators": [{"name": "op", "ssh_keys": [(keys / "op.pub").read_text().strip()]}],
        "proxy_url": proxy_url(HOST, proxy.settings.proxy_port, "m1", proxy.token(identity)),
        "ca_cert": proxy.root.ca_cert.read_text(),
        "nomad_servers": [],
        "autovibe_repo": "unused: the image is provisioned",
        "autovibe_ref": "unused",
        "network": NETWORK,
        "vcpus": 2,
        "memory_mb": 2048,
        "disk_gb": 8,
        "desktop": True,
    }
    vars_file = keys / "vars.json"  # JSON is YAML
    vars_file.write_text(json.dumps(variables))
    _cli("vm", "down", NAME, timeout=120)  # a VM left by an interrupted run
    figures: dict[str, float] = {}
    start = time.monotonic()
    _image, built = vm_image.build(vm_image.ImageRecipe(), DataRoot.at(CACHE))
    if built:
        figures["image_build_s"] = time.monotonic() - start
    start = time.monotonic()
    up = _cli("vm", "up", NAME, "--vars", str(vars_file), "--identity", str(keys / "op"),
              "--timeout", "600")  # fmt: skip
    figures["vm_up_s"] = time.monotonic() - start
    assert up.returncode == 0, up.stdout + up.stderr
    assert "accelerator: " in up.stderr
    figures["cloud_init_done_s"] = float(up.stderr.split("cloud-init done ")[1].split(" s")[0])
    print(f"\nVM figures: {figures}", file=sys.stderr)
    try:
        yield figures
    finally:
        down = _cli("vm", "down", NAME, timeout=120)
        assert down.returncode == 0, down.stderr
        assert vm_host.state(NAME) is None
        assert not Path(f"/var/lib/libvirt/images/{NAME}.qcow2").exists()


def ssh(command: str) -> subprocess.CompletedProcess[str]:
    """`command` on the VM as the operator, by the argv `autovibe worker ssh` runs (the CLI
    itself is run once, in the first check: its start costs seconds on a loaded host)."""
    files = vm_host.VmFiles.of(DataRoot.at(CACHE), NAME)
    access = json.loads(files.access_path.read_text())
    argv = vm_host.ssh_argv(files.spec(), access["user"], Path(access["identity"]),
                            files.known_hosts)  # fmt: skip
    return subprocess.run([*argv, command], capture_output=True, text=True, timeout=120)


def test_the_vm_boots_from_the_rendered_domain(booted: dict[str, float]) -> None:
    accel, _ = vm_host.accelerator()
    listed = _cli("vm", "ls")
    row = next(line for line in listed.stdout.splitlines() if NAME in line)
    assert "running" in row and accel in row and "192.168.151." in row
    xml = vm_host.virsh("dumpxml", NAME).stdout
    assert "machine='pc-q35" in xml or "machine='q35'" in xml
    assert ("type='kvm'" if accel == "kvm" else "type='qemu'") in xml.split("\n", 1)[0]
    assert "<kernel>/var/lib/libvirt/images/autovibe-" in xml
    assert booted["cloud_init_done_s"] < 600


def test_operator_ssh_sees_cloud_init_done_and_the_proxy_ca_trusted(booted: object) -> None:
    proc = _cli(
        "worker", "ssh", NAME, "--",
        "cloud-init status; hostname; id -nG; "
        "openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt "
        "/usr/local/share/ca-certificates/autovibe-proxy.crt; "
        "systemctl show -p LoadState autovibe-worker@x.service; "
        "systemctl is-active autovibe-desktop.service",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "status: done"
    assert lines[1] == NAME
    assert "sudo" in lines[2].split()
    assert lines[3].endswith(": OK")  # the proxy's CA verifies against the system bundle
    assert lines[4] == "LoadState=loaded"  # the runner's unit, installed by cloud-init
    assert lines[5] == "active"


def test_nothing_leaves_the_vm_but_through_the_proxy(booted: object, upstream: Upstream) -> None:
    # The upstream listens on the host's loopback; the VM network reaches no mirror either.
    for target in (f"http://{HOST}:{upstream.port}/", "http://deb.debian.org/", "http://1.1.1.1/"):
        proc = ssh(f"curl --noproxy '*' -sS -m 5 -o /dev/null {target}")
        assert proc.returncode != 0, f"{target} reached directly: {proc.stdout}"
    assert not upstream.seen


def test_a_request_through_the_proxy_is_captured_as_the_vm(
    booted: object, proxy: Proxy, upstream: Upstream
) -> None:
    # The proxy variables come from cloud-init's /etc/environment (no_proxy lists 127.0.0.1,
    # which here is the proxy host's own loopback, reached only through the proxy).
    proc = ssh(
        f"curl -sS -m 30 --proxy \"$http_proxy\" --noproxy '' "
        f"http://127.0.0.1:{upstream.port}/from-the-vm"
    )
    assert proc.returncode == 0 and proc.stdout == "just a web page\n", proc.stderr
    record = proxy.spooled_one(path="/from-the-vm")
    assert (record.project, record.machine, record.assignment) == ("p1", "m1", "a-vm")
    assert record.status == 200


def test_vnc_snapshot_is_a_png_of_the_desktop(booted: object, tmp_path: Path) -> None:
    out = tmp_path / "desktop.png"
    proc = _cli("worker", "vnc", NAME, "--snapshot", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as picture:
        assert picture.size == (1920, 1080)
    # VNC listens on the VM's loopback only: not on its network address.
    assert ssh("ss -Hltn 'sport = :5901'").stdout.split()[3].startswith(("127.0.0.1", "[::1]"))


def test_a_running_vm_is_snapshotted_and_restored(booted: object) -> None:
    """`autovibe checkpoints vm-save` keeps disk and memory inside the qcow2; `vm-restore`
    brings both back, the VM running (last: it rewinds the VM)."""
    mark = "echo {0} | sudo tee /root/mark >/dev/null && echo {0} > /dev/shm/mark && sync"
    assert ssh(mark.format("before")).returncode == 0
    save = _cli("checkpoints", "vm-save", NAME, "t1-000-vm", "--project", "p1", timeout=120)
    assert save.returncode == 0, save.stderr
    record = json.loads((CACHE / "checkpoints/p1/vm-snapshots/t1-000-vm.json").read_text())
    assert record["image"] == f"/var/lib/libvirt/images/{NAME}.qcow2"
    assert record["domain"] == NAME
    assert ssh(mark.format("after")).returncode == 0
    restore = _cli("checkpoints", "vm-restore", NAME, "t1-000-vm", timeout=120)
    assert restore.returncode == 0, restore.stderr
    assert vm_host.state(NAME) == "running"
    back = ssh("sudo cat /root/mark /dev/shm/mark")  # disk, then memory (tmpfs)
    assert back.stdout == "before\nbefore\n", back.stderr

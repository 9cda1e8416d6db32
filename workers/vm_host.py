"""A worker VM's life on its libvirt host: accelerator, network, disk, seed, domain, SSH.

`up` installs a built image into libvirt's image folder, makes the VM's disk (a qcow2 overlay
of it) and its cloud-init NoCloud seed, defines the domain from the rendered `domain.xml`
(`virsh define`, `qemu:///system`) and starts it; `wait_ready` waits, bounded, until SSH
answers and cloud-init has finished. Each VM keeps its rendered files, its spec (`vm.json`,
with the address it got) and its SSH known_hosts in `$AUTOVIBE_DATA/vms/<name>/`.

The VM network is isolated (no `<forward>`), and fenced on the host (`fence`): a VM reaches
its host's proxy port, and nothing else.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from contracts.dataroot import DataRoot
from workers.vm import VmSpec
from workers.vm_image import VmImage

URI = "qemu:///system"
LIBVIRT_IMAGES = Path("/var/lib/libvirt/images")
KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01


class VmHostError(Exception):
    """libvirt, qemu-img or SSH refused: the command and what it said."""


def accelerator() -> tuple[Literal["kvm", "tcg"], str]:
    """KVM when the CPU has hardware virtualisation and /dev/kvm makes a VM; else TCG
    (emulation), with the reason. Both are checked: some sandboxes offer a /dev/kvm that
    creates VMs whose guests never run."""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError as exc:
        return "tcg", f"/proc/cpuinfo unreadable: {exc}"
    if not flags & {"vmx", "svm"}:
        return "tcg", "the CPU has no hardware virtualisation (no vmx/svm flag)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return "tcg", f"/dev/kvm: {exc.strerror}"
    try:
        if fcntl.ioctl(fd, KVM_GET_API_VERSION) != 12:
            return "tcg", "/dev/kvm speaks another KVM API than 12"
        os.close(fcntl.ioctl(fd, KVM_CREATE_VM, 0))
    except OSError as exc:
        return "tcg", f"/dev/kvm cannot create a VM: {exc.strerror}"
    finally:
        os.close(fd)
    return "kvm", "vmx/svm and /dev/kvm"


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which("virsh") is None:
        raise VmHostError("virsh not found: install libvirt-clients and libvirt-daemon-system")
    proc = subprocess.run(
        ["virsh", "-q", "-c", URI, *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        hint = ""
        if "Failed to connect socket" in proc.stderr:
            hint = " (libvirtd is not running: `systemctl start libvirtd`, or `libvirtd -d`)"
        raise VmHostError(f"virsh {' '.join(args)}: {proc.stderr.strip()}{hint}")
    return proc


def _run(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        raise VmHostError(f"{argv[0]} not found: install it (make system-deps does)")
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise VmHostError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


# -- the VM network -----------------------------------------------------------------------------


def network_xml(name: str, host_cidr: str) -> str:
    """An isolated libvirt network: DHCP from the host's address, no forwarding."""
    iface = ipaddress.ip_interface(host_cidr)
    hosts = list(iface.network.hosts())
    first, last = hosts[min(9, len(hosts) - 1)], hosts[-1]
    bridge = ("av-" + re.sub(r"[^a-z0-9]", "", name))[:15]
    return (
        f"<network>\n  <name>{name}</name>\n"
        f'  <bridge name="{bridge}" stp="on" delay="0"/>\n'
        f'  <ip address="{iface.ip}" netmask="{iface.network.netmask}">\n'
        f'    <dhcp><range start="{first}" end="{last}"/></dhcp>\n'
        "  </ip>\n</network>\n"
    )


def ensure_network(name: str, host_cidr: str, folder: Path) -> None:
    """Define and start the network `name` unless libvirt has it; an existing one is used
    as it is."""
    if virsh("net-info", name, check=False).returncode != 0:
        xml = folder / f"network-{name}.xml"
        xml.write_text(network_xml(name, host_cidr))
        virsh("net-define", str(xml))
        virsh("net-autostart", name)
    info = virsh("net-info", name).stdout
    if re.search(r"^Active:\s+no", info, re.M):
        virsh("net-start", name)


def bridge_of(name: str) -> str:
    """The host bridge of libvirt network `name` (`virsh net-info`)."""
    match = re.search(r"^Bridge:\s+(\S+)", virsh("net-info", name).stdout, re.M)
    if match is None:
        raise VmHostError(f"network {name}: virsh net-info names no bridge")
    return match.group(1)


def fence_argv(network: str, bridge: str, ports: list[int]) -> list[list[str]]:
    """iptables commands that let a VM on `bridge` reach this host on `ports` (the proxy) and
    for DHCP only: its own chain, emptied and filled, jumped to first from INPUT. Replies to
    what the host opened (SSH, its tunnels) pass as established; DNS is refused (libvirt's
    dnsmasq would resolve names out for it)."""
    chain = f"AV-{re.sub(r'[^A-Za-z0-9]', '', network)}"[:28]
    rules = [
        ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "RETURN"],
        ["-p", "udp", "--dport", "67", "-j", "RETURN"],
        *(["-p", "tcp", "--dport", str(port), "-j", "RETURN"] for port in ports),
        ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["-j", "REJECT"],
    ]
    return [
        ["iptables", "-w", "-N", chain],
        ["iptables", "-w", "-F", chain],
        *(["iptables", "-w", "-A", chain, *rule] for rule in rules),
        ["iptables", "-w", "-I", "INPUT", "1", "-i", bridge, "-j", chain],
    ]


def fence(network: str, ports: list[int]) -> None:
    """Let the VMs of `network` reach this host on `ports` and nothing else (idempotent)."""
    bridge = bridge_of(network)
    for argv in fence_argv(network, bridge, ports):
        if argv[2] == "-N":
            subprocess.run(argv, capture_output=True, check=False)  # exists already: kept
        elif argv[2] == "-I":
            check = ["iptables", "-w", "-C", "INPUT", *argv[5:]]
            if subprocess.run(check, capture_output=True, check=False).returncode != 0:
                _run(argv)
        else:
            _run(argv)


# -- one VM -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VmFiles:
    """`$AUTOVIBE_DATA/vms/<name>/`: rendered files, spec, known_hosts."""

    folder: Path

    @classmethod
    def of(cls, root: DataRoot, name: str) -> VmFiles:
        return cls(root.root / "vms" / name)

    @property
    def spec_path(self) -> Path:
        return self.folder / "vm.json"

    @property
    def access_path(self) -> Path:
        """Who `worker ssh` logs in as, and with which key: {user, identity}."""
        return self.folder / "access.json"

    @property
    def known_hosts(self) -> Path:
        return self.folder / "known_hosts"

    def spec(self) -> VmSpec:
        return VmSpec.model_validate_json(self.spec_path.read_text())


def installed(key: str) -> VmImage:
    """Where `install_image` puts the image of this key."""
    return VmImage(LIBVIRT_IMAGES / f"autovibe-{key}")


def install_image(image: VmImage) -> VmImage:
    """The image copied into libvirt's image folder (once per key), where the unprivileged
    qemu process may read it; the data root stays private to its owner."""
    target = installed(image.folder.name)
    if target.complete():
        return target
    part = target.folder.with_name(target.folder.name + f".part-{os.getpid()}")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(mode=0o755, parents=True)
    for src in (image.disk, image.kernel, image.initrd, image.manifest_path):
        shutil.copy2(src, part / src.name)
        os.chmod(part / src.name, 0o644)
    shutil.rmtree(target.folder, ignore_errors=True)
    part.rename(target.folder)
    return target


def make_disk(spec: VmSpec, image: VmImage) -> None:
    """The VM's disk: a qcow2 overlay of the image, `disk_gb` large."""
    Path(spec.disk).parent.mkdir(parents=True, exist_ok=True)
    _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
          "-b", str(image.disk), str(spec.disk), f"{spec.disk_gb}G"])  # fmt: skip


def make_seed(spec: VmSpec, user_data: Path, meta_data: Path) -> None:
    """The NoCloud seed: an ISO 9660 volume labelled `cidata` holding user-data, meta-data."""
    Path(spec.seed).parent.mkdir(parents=True, exist_ok=True)
    staging = Path(spec.seed).with_suffix(".d")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    shutil.copy(user_data, staging / "user-data")
    shutil.copy(meta_data, staging / "meta-data")
    try:
        _run(["genisoimage", "-quiet", "-output", str(spec.seed), "-volid", "cidata", "-joliet",
              "-rock", str(staging / "user-data"), str(staging / "meta-data")])  # fmt: skip
    finally:
        shutil.rmtree(staging)


def define_and_start(domain_xml: Path, name: str) -> None:
    virsh("define", str(domain_xml))
    virsh("start", name)


def state(name: str) -> str | None:
    """libvirt's state of the domain (`running`, `shut off`, …), None when undefined."""
    proc = virsh("domstate", name, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def domains() -> list[str]:
    return [line for line in virsh("list", "--all", "--name").stdout.splitlines() if line]


def address(name: str) -> str | None:
    """The VM's IPv4 address from the network's DHCP leases, None before it has one."""
    proc = virsh("domifaddr", name, "--source", "lease", check=False)
    match = re.search(r"ipv4\s+(\d+\.\d+\.\d+\.\d+)/", proc.stdout)
    return match.group(1) if match else None


def destroy(spec: VmSpec) -> None:
    """Stop the domain, undefine it, remove its disk and seed."""
    if state(spec.name) == "running":
        virsh("destroy", spec.name)
    if state(spec.name) is not None:
        virsh("undefine", spec.name, "--snapshots-metadata")
    for path in (Path(spec.disk), Path(spec.seed)):
        path.unlink(missing_ok=True)


# -- SSH ----------------------------------------------------------------------------------------


def ssh_argv(
    spec: VmSpec, user: str, identity: Path | None, known_hosts: Path, *extra: str
) -> list[str]:
    """ssh to the VM as `user`: key only, host key learnt on first use into the VM's own
    known_hosts (its host keys are made at its first boot)."""
    if spec.address is None:
        raise VmHostError(f"{spec.name} has no address yet (virsh domifaddr {spec.name})")
    argv = [
        "ssh", "-p", str(spec.ssh_port),
        "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no",
        "-o", "StrictHostKeyChecking=accept-new", "-o", f"UserKnownHostsFile={known_hosts}",
        "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=15",
    ]  # fmt: skip
    if identity is not None:
        argv += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
    return [*argv, *extra, f"{user}@{spec.address}"]


def wait_ready(
    spec: VmSpec, user: str, identity: Path | None, known_hosts: Path, timeout_s: float
) -> tuple[str, float]:
    """Wait until the VM has an address, answers SSH and cloud-init is done; return its
    address and the seconds it took. cloud-init ending in error is a VmHostError naming it."""
    start = time.monotonic()
    deadline = start + timeout_s
    current = spec
    while current.address is None:
        if time.monotonic() > deadline:
            raise VmHostError(f"{spec.name}: no DHCP lease after {timeout_s:.0f} s")
        if (found := address(spec.name)) is not None:
            current = spec.model_copy(update={"address": found})
        else:
            time.sleep(2)
    last = ""
    while time.monotonic() < deadline:
        left = max(5, int(deadline - time.monotonic()))
        argv = ssh_argv(current, user, identity, known_hosts)
        try:
            proc = subprocess.run(
                [*argv, f"timeout {left} cloud-init status --wait --long"],
                capture_output=True,
                text=True,
                timeout=left + 15,
                check=False,
            )
        except subprocess.TimeoutExpired:
            break
        last = (proc.stdout + proc.stderr).strip()
        if proc.returncode == 0 and "status: done" in proc.stdout:
            return str(current.address), time.monotonic() - start
        if "status: error" in proc.stdout:
            raise VmHostError(f"{spec.name}: cloud-init ended in error:\n{last}")
        time.sleep(3)  # sshd not up yet
    raise VmHostError(f"{spec.name}: cloud-init not done after {timeout_s:.0f} s; last: {last}")


@contextlib.contextmanager
def tunnel(
    spec: VmSpec, user: str, identity: Path | None, known_hosts: Path, remote_port: int
) -> Iterator[int]:
    """An SSH tunnel from a free port on this host's loopback to `remote_port` on the VM's
    loopback (the VNC server listens nowhere else); yields the local port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        local = int(probe.getsockname()[1])
    forward = f"127.0.0.1:{local}:127.0.0.1:{remote_port}"
    argv = ssh_argv(spec, user, identity, known_hosts, "-N", "-o", "ExitOnForwardFailure=yes",
                    "-L", forward)  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise VmHostError(f"ssh tunnel to {spec.name} ended: {stderr.strip()}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), 1):
                break
            if time.monotonic() > deadline:
                raise VmHostError(f"ssh tunnel to {spec.name}: port {local} not open in 30 s")
            time.sleep(0.2)
        yield local
    finally:
        proc.terminate()
        proc.wait(10)


def vnc_snapshot(port: int, out: Path) -> None:
    """A screenshot of the VNC display on this host's `port`, written as PNG (vncsnapshot
    writes JPEG; Pillow converts). Hextile: with its default raw encoding on a loopback
    address, vncsnapshot never completes a frame from TigerVNC."""
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        jpeg = Path(tmp) / "shot.jpg"
        _run(
            [
                "vncsnapshot",
                "-quiet",
                "-allowblank",
                "-encodings",
                "hextile",
                f"127.0.0.1::{port}",
                str(jpeg),
            ]
        )
        with Image.open(jpeg) as picture:
            picture.save(out, format="PNG")

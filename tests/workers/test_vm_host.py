"""The libvirt host side of worker VMs that runs without booting one: the accelerator found
from the host itself, the isolated network checked by libvirt's own schema, the SSH command,
and `vm up` refusing missing variables before it builds or defines anything. The boot itself
is tests/workers/test_vm_boot.py (marker `vm`)."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path, PurePosixPath

import pytest
from typer.testing import CliRunner

from workers import vm_host
from workers.vm import VmSpec
from workers.vm_cli import app


def _cpu_flags() -> set[str]:
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    return flags


def test_the_accelerator_is_detected_from_this_host() -> None:
    accel, why = vm_host.accelerator()
    if not _cpu_flags() & {"vmx", "svm"}:  # this development machine: KVM must not be assumed
        assert (accel, why) == ("tcg", "the CPU has no hardware virtualisation (no vmx/svm flag)")
    elif accel == "tcg":
        assert why.startswith("/dev/kvm")
    else:
        assert why == "vmx/svm and /dev/kvm"


def test_the_vm_network_is_isolated_and_valid(tmp_path: Path) -> None:
    xml = vm_host.network_xml("autovibe", "192.168.150.1/24")
    path = tmp_path / "network.xml"
    path.write_text(xml)
    validate = shutil.which("virt-xml-validate")
    assert validate, "virt-xml-validate not found: install libvirt-clients"
    proc = subprocess.run([validate, str(path), "network"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    network = ET.fromstring(xml)
    assert network.find("forward") is None  # no route out: the VMs reach the host only
    ip = network.find("ip")
    assert ip is not None and ip.attrib == {"address": "192.168.150.1", "netmask": "255.255.255.0"}
    dhcp = network.find("ip/dhcp/range")
    assert dhcp is not None
    assert dhcp.attrib == {"start": "192.168.150.10", "end": "192.168.150.254"}
    bridge = network.find("bridge")
    assert bridge is not None and bridge.attrib["name"] == "av-autovibe"
    long = ET.fromstring(vm_host.network_xml("a-very-long-network-name", "10.9.0.1/16"))
    assert len(long.find("bridge").attrib["name"]) <= 15  # type: ignore[union-attr]


def test_ssh_is_key_only_into_the_vms_own_known_hosts(tmp_path: Path) -> None:
    spec = VmSpec(name="w1", address="192.168.150.20", ssh_port=2222)
    argv = vm_host.ssh_argv(spec, "alice", tmp_path / "id", tmp_path / "kh", "-N")
    assert argv[:3] == ["ssh", "-p", "2222"] and argv[-1] == "alice@192.168.150.20"
    options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
    assert {"BatchMode=yes", "PasswordAuthentication=no", "IdentitiesOnly=yes"} <= set(options)
    assert f"UserKnownHostsFile={tmp_path / 'kh'}" in options
    assert argv[argv.index("-i") + 1] == str(tmp_path / "id") and "-N" in argv
    with pytest.raises(vm_host.VmHostError, match=r"w1 has no address yet"):
        vm_host.ssh_argv(VmSpec(name="w1"), "alice", None, tmp_path / "kh")


def test_vm_up_names_every_missing_variable_before_building_anything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    result = CliRunner().invoke(
        app, ["up", "w1", "--var", "proxy_url=http://m:t@h:1", "--var", "accel=tcg"],
        env={"AUTOVIBE_DATA": str(data)},
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    for name in ("operators", "ca_cert", "nomad_servers", "autovibe_repo", "autovibe_ref"):
        assert f"  {name}: " in result.output
    assert not data.exists()  # no image build begun, no VM folder written


def test_installed_images_live_where_libvirts_qemu_may_read_them() -> None:
    image = vm_host.installed("0123456789abcdef")
    assert image.folder == Path("/var/lib/libvirt/images/autovibe-0123456789abcdef")
    spec = VmSpec(name="w1", kernel=PurePosixPath(str(image.kernel)))
    assert str(spec.kernel).endswith("autovibe-0123456789abcdef/vmlinuz")


def test_the_fence_lets_a_vm_reach_the_proxy_port_and_dhcp_only() -> None:
    argv = vm_host.fence_argv("autovibe-test", "av-autovibetest", [8080])
    chain = "AV-autovibetest"
    assert argv[:2] == [["iptables", "-w", "-N", chain], ["iptables", "-w", "-F", chain]]
    rules = [" ".join(a[4:]) for a in argv if a[2] == "-A"]
    assert rules == [
        "-m conntrack --ctstate ESTABLISHED,RELATED -j RETURN",  # replies to the host's SSH
        "-p udp --dport 67 -j RETURN",  # DHCP, answered by libvirt's dnsmasq
        "-p tcp --dport 8080 -j RETURN",
        "-p tcp -j REJECT --reject-with tcp-reset",
        "-j REJECT",  # DNS and every other port, the model server's included
    ]
    # First in INPUT, before libvirt's own chain accepts DNS for the network.
    assert argv[-1] == ["iptables", "-w", "-I", "INPUT", "1", "-i", "av-autovibetest", "-j", chain]

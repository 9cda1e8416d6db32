"""A worker VM booted for real: the image built (or taken from the cache), the domain defined in
libvirt from the rendered domain.xml, cloud-init waited for, then checked over SSH as the
operator: the proxy's CA trusted, no way out but the proxy, a request through the proxy
captured under the VM's machine identity, the desktop's VNC screenshot a PNG; then one
assignment of the demo trial submitted to the control API with `driver: vm` runs inside the
VM (the runner in its unit, the built-in agent in bubblewrap there) against the host's model
server (the deterministic one) through the platform's mitmdump, and is graded, posted and
reported like a local one.

Marker `vm` (with `slow`), left out of `make test` (`make test-vm` runs it): 7 passed in 9 min 13 s
at load 5-10 on 2 shared cores under TCG (vm up 238 s, of which cloud-init 207 s; the
assignment 142 s from submission to the finished trial, its runner 78 s in the VM), +30 s when
our code changed since the image was built (its worker layer), +4 min for a first build. Needs
root (libvirt's qemu:///system, mmdebstrap, iptables) and a Debian mirror for the first build.
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
import yaml
from fastapi.testclient import TestClient
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "proxy"))
from proxy_harness import Proxy, Upstream, running_proxy, serve

from budget import open_ample
from contracts.credentials import load_or_create_key, proxy_url
from contracts.dataroot import DataRoot
from contracts.reports import TrialReport
from contracts.settings import PROJECT_ROOT, Settings, free_port
from ledger.book import Ledger, vm_account
from ledger.check import bean_check
from ledger.reconcile import reconcile
from orchestrator.api import create_app
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler
from orchestrator.state import Trial
from proxy.launch import mitmdump_argv
from tests.serving.model_harness import deterministic_server
from workers import vm_host, vm_image
from workers.result import read_result
from workers.vm_driver import VmDriver

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


ANSWERS = ["    return a + b\n", "    return n % 2 == 0\n"]
"""The model's answers, in order: the bodies of mathkit's two stubs (`add`, then `is_even`)."""


@pytest.fixture(scope="module")
def settings(libvirt: None, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The platform on the host's address of the VM network: proxy, model server and the
    addresses the scheduler gives workers are all there."""
    return Settings(
        data=tmp_path_factory.mktemp("platform"), configs=PROJECT_ROOT / "configs", host=HOST,
        proxy_port=free_port(HOST), model_port=free_port(HOST),
        task_roots=[PROJECT_ROOT / "examples"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def proxy(settings: Settings) -> Iterator[Proxy]:
    """The platform's mitmdump (its addons, configs/ prices) in front of the deterministic model
    server; project p1 with machine m1 for the VM's own identity."""
    root = DataRoot.at(settings.data)
    key = load_or_create_key(root)
    open_ample(root.budget_counters, "p1", ["m1"])
    with (
        deterministic_server(settings, ANSWERS),
        running_proxy(settings, root, key, mitmdump_argv(settings)) as proxy,
    ):
        yield proxy


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


def test_nothing_leaves_the_vm_but_through_the_proxy(
    booted: object, upstream: Upstream, proxy: Proxy
) -> None:
    # The upstream listens on the host's loopback; the model server on the host's address of
    # the VM network, fenced off but for the proxy's port; the network reaches no mirror.
    model = f"http://{HOST}:{proxy.settings.model_port}/v1/models"
    targets = (
        f"http://{HOST}:{upstream.port}/",
        model,
        "http://deb.debian.org/",
        "http://1.1.1.1/",
    )
    for target in targets:
        proc = ssh(f"curl --noproxy '*' -sS -m 5 -o /dev/null {target}")
        assert proc.returncode != 0, f"{target} reached directly: {proc.stdout}"
    assert not upstream.seen
    # No names either: libvirt's dnsmasq would resolve them out for the VM.
    assert ssh("timeout 10 getent hosts example.com").stdout == ""


def test_a_request_through_the_proxy_is_captured_as_the_vm(booted: object, proxy: Proxy) -> None:
    # The proxy variables come from cloud-init's /etc/environment.
    model = f"http://{HOST}:{proxy.settings.model_port}/v1/models"
    proc = ssh(f'curl -sS -m 30 --proxy "$http_proxy" {model}')
    assert proc.returncode == 0 and '"tiny"' in proc.stdout, proc.stdout + proc.stderr
    record = proxy.spooled_one(path="/v1/models")
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


def demo_assignment() -> dict[str, object]:
    """One builtin-agent assignment of the demo trial (its first task), on worker VMs."""
    trial = yaml.safe_load((PROJECT_ROOT / "configs/trials/demo.yaml").read_text())
    task = trial["tasks"][0]
    task["repo"] = str((PROJECT_ROOT / "configs/trials" / task["repo"]).resolve())
    return {
        **trial,
        "name": "demo-in-a-vm",
        "machines": {**trial["machines"], "count": 1},
        "assignment": {**trial["assignment"], "trials_per_task": 1},
        "driver": "vm",
        "tasks": [task],
    }


def test_an_assignment_runs_inside_the_vm_and_is_graded_posted_and_reported(
    booted: dict[str, float], settings: Settings, proxy: Proxy
) -> None:
    app = create_app(settings, run_scheduler=False)
    root = DataRoot.at(settings.data)
    token = (root.secrets / "operator-token").read_text().strip()
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        platform: Platform = app.state.platform
        # The driver by its short name, reading the VMs `vm up` made in the tests' data root.
        platform.drivers["vm"] = VmDriver(root=CACHE)
        submitted = client.post("/v1/trials", json=demo_assignment())
        assert submitted.status_code == 201, submitted.text
        trial_id = submitted.json()["id"]
        start = time.monotonic()
        scheduler = Scheduler(platform)
        try:
            deadline = start + 900
            while time.monotonic() < deadline:
                scheduler.tick()
                with platform.store.session() as s:
                    trial = s.get_one(Trial, trial_id)
                    [a] = trial.assignments
                    ended = trial.status == "finished"
                    state, machine, assignment = a.state, a.machine, a.id
                if ended:
                    break
                time.sleep(1)
        finally:
            scheduler.stop()
        booted["assignment_s"] = time.monotonic() - start
        assert ended, f"assignment still {state} after 900 s"

        # It ran in the VM: the runner's unit there, its outputs brought back here.
        artifacts = root.assignment_dir("demo", trial_id, assignment)
        assert (artifacts / "vm.txt").read_text() == f"{NAME}\n"
        result = read_result(artifacts / "result.json", assignment)
        assert result.infra_error is None, result.infra_error
        inside = f"/mnt/data/autovibe/worker-artifacts/demo/{trial_id}/{assignment}"
        assert result.patch == f"{inside}/patch.diff"  # written in the VM
        assert result.grade is not None and result.grade.status == "resolved", result.grade
        booted["runner_wall_s"] = result.wall_s
        print(f"\nVM figures: {booted}", file=sys.stderr)
        assert "return a + b" in (artifacts / "patch.diff").read_text()
        assert (artifacts / "output" / "transcript.jsonl").is_file()
        assert not (artifacts / "workspace").exists()  # only the patch leaves the VM
        assert (artifacts / "runner.log").is_file()  # the unit's journal
        unit = ssh(
            "systemctl show -p ExecStart -p Environment -p User "
            f"autovibe-worker@$(systemd-escape --path {inside}/spec.json)"
        )
        assert (
            "/opt/autovibe/.venv/bin/python ; argv[]=/opt/autovibe/.venv/bin/python -m "
            "workers.runner" in unit.stdout
        ), unit.stdout
        assert "PYTHONUNBUFFERED=1" in unit.stdout and "User=autovibe" in unit.stdout

        # Its model calls went through the proxy from the VM, metered under the assignment.
        calls = [r for r in proxy.spooled() if r.assignment == assignment]
        assert len(calls) >= 2 and all(r.machine == machine == "m1" for r in calls), calls
        assert all(r.trial == trial_id and r.usage is not None for r in calls if r.status == 200)

        # Reported like a local one: one row, resolved, its cost the metered spend.
        served = client.get(f"/v1/trials/{trial_id}/report")
        assert served.status_code == 200, served.text
        [row] = TrialReport.model_validate(served.json()).rows
        assert (row.agent, row.model, row.n, row.resolved) == ("builtin", "tiny", 1, 1)
        assert row.cost_usd > 0

        # Posted like a local one: usage per machine × model, reconciled; the VM's time booked.
        platform.post_usage("demo")
        ledger = root.ledger("demo")
        assert bean_check(ledger) == []
        reconciled = reconcile(Ledger(ledger), platform.index, "demo")
        assert reconciled.ok, [line.describe(reconciled.currency) for line in reconciled.mismatches]
        assert {line.key: line.kind for line in reconciled.lines}[assignment] == "match"
        books = Ledger(ledger).text()  # the head and its journal segments
        assert f"VM time of {assignment} on m1 (vm)" in books and vm_account("m1") in books


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

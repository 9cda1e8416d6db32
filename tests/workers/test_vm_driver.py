"""The `vm` worker driver without a VM: the spec as the VM's runner reads it, what is shipped,
and the runner started with the Nomad job's command and environment. The run inside a booted
VM is in test_vm_boot.py (marker `vm`)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path, PurePosixPath

import pytest

from contracts.config import NomadCluster
from contracts.dataroot import DataRoot
from workers.driver import get_driver
from workers.nomad import render_job
from workers.spec import AssignmentSpec, SandboxSpec
from workers.vm import WORKER_UNIT, VmSpec
from workers.vm_driver import RUNNER_ARGV, RUNNER_ENV, VM_CA, VmDriver, for_vm, shipment


def _spec(host: Path, repo: Path) -> AssignmentSpec:
    root = DataRoot.at(host)
    ca = str(root.ca_cert)
    return AssignmentSpec(
        assignment="a1", project="p", trial="t", machine="m1", task_id="x", repo=repo,
        prompt="do it", test_command="python -m pytest -q", fail_to_pass=["t::a"],
        pass_to_pass=[], timeout_s=60, agent="builtin", model="tiny",
        endpoint="http://192.168.150.1:8500/v1",
        env={"SSL_CERT_FILE": ca, "HTTP_PROXY": "http://m1:tok@127.0.0.1:8080"},
        artifacts=root.assignment_dir("p", "t", "a1"), data_root=host,
        sandbox=SandboxSpec(proxy_host="192.168.150.1", proxy_port=8080, memory_mb=1024, cpus=1,
                            hidden=[host], read_only=[root.ca_cert, host / "agents" / "x"]),
    )  # fmt: skip


def test_the_spec_names_the_vms_paths(tmp_path: Path) -> None:
    spec = _spec(tmp_path / "data", tmp_path / "repo")
    vm = VmSpec(data_root=PurePosixPath("/mnt/data/autovibe"))
    inside = for_vm(spec, vm, tmp_path / "data")
    folder = Path("/mnt/data/autovibe/worker-artifacts/p/t/a1")
    assert (inside.artifacts, inside.repo) == (folder, folder / "task-repo")
    assert inside.data_root == Path("/mnt/data/autovibe")
    assert inside.env["SSL_CERT_FILE"] == str(VM_CA)
    assert inside.env["HTTP_PROXY"] == spec.env["HTTP_PROXY"]  # its own credential, bridged
    assert inside.sandbox is not None
    assert inside.sandbox.hidden == [Path("/mnt/data/autovibe")]
    assert inside.sandbox.read_only == [Path(VM_CA), Path("/mnt/data/autovibe/agents/x")]
    assert (inside.sandbox.proxy_host, inside.sandbox.proxy_port) == ("192.168.150.1", 8080)
    assert inside.endpoint == spec.endpoint and inside.prompt == spec.prompt


def test_the_shipment_holds_the_spec_private_and_the_repo_less_caches(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "pkg" / "__pycache__").mkdir(parents=True)
    (repo / "pkg" / "m.py").write_text("x = 1\n")
    (repo / "pkg" / "__pycache__" / "m.cpython-311.pyc").write_bytes(b"\0")
    spec = _spec(tmp_path / "data", repo)
    inside = for_vm(spec, VmSpec(), tmp_path / "data")
    with tarfile.open(fileobj=io.BytesIO(shipment(spec, inside))) as tar:
        members = {m.name: m for m in tar.getmembers()}
        folder = "mnt/data/autovibe/worker-artifacts/p/t/a1"
        assert members[f"{folder}/spec.json"].mode == 0o600
        sent = tar.extractfile(members[f"{folder}/spec.json"])
        assert sent is not None
        assert AssignmentSpec.model_validate_json(sent.read()) == inside
    assert f"{folder}/task-repo/pkg/m.py" in members
    assert not [name for name in members if "__pycache__" in name]


def test_the_runner_starts_as_the_nomad_jobs_task_starts_it() -> None:
    task = render_job("builtin", NomadCluster())["TaskGroups"][0]["Tasks"][0]
    assert task["Config"]["args"] == [*RUNNER_ARGV, "${NOMAD_TASK_DIR}/spec.json"]
    assert task["Env"] == RUNNER_ENV
    unit = WORKER_UNIT.read_text().splitlines()
    assert "ExecStart=/opt/autovibe/.venv/bin/python " + " ".join(RUNNER_ARGV) + " %f" in unit
    for name, value in RUNNER_ENV.items():
        assert f"Environment={name}={value}" in unit
    assert "EnvironmentFile=-/etc/environment" in unit  # cloud-init's proxy and CA


def test_the_driver_is_picked_by_its_short_name(tmp_path: Path) -> None:
    driver = get_driver("vm")
    assert isinstance(driver, VmDriver) and driver.name == "vm"
    assert VmDriver(root=tmp_path).vms() == []


@pytest.mark.parametrize(
    "environment", [{"environment": ["dc"]}, {"setup": ["pip install -e ."]}], ids=str
)
def test_a_task_environment_is_refused_before_anything_is_shipped(
    tmp_path: Path, environment: dict[str, list[str]]
) -> None:
    spec = _spec(tmp_path / "data", tmp_path / "repo").model_copy(update=environment)
    with pytest.raises(OSError, match=r"not built in worker VMs.*driver: local"):
        VmDriver(root=tmp_path / "data").launch(spec)
    assert not spec.artifacts.exists()

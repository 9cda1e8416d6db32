"""The Nomad driver, real python-nomad, against the documented API (stand-in) or a real Nomad.

The contract tests check every request the driver makes against the Nomad HTTP API docs
(`nomad_harness`); the live tests (`pytest -m live`, with NOMAD_ADDR set) run the same driver
against a real agent whose clients run raw_exec and see this machine's paths.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from nomad_harness import NomadDouble

from contracts.config import NomadCluster, TrialConfig
from contracts.settings import Settings
from orchestrator.catalog import Catalog
from workers.driver import get_driver
from workers.nomad import RECORD, NomadDriver, NomadError, cluster_for, render_job
from workers.spec import AssignmentSpec

MakeSpec = Callable[..., AssignmentSpec]


@pytest.fixture
def double() -> Iterator[NomadDouble]:
    nomad = NomadDouble()
    nomad.start()
    yield nomad
    nomad.stop()
    assert not nomad.violations, "requests outside the documented API:\n" + "\n".join(
        nomad.violations
    )


@pytest.fixture
def make_spec(tmp_path: Path) -> MakeSpec:
    def make(assignment: str = "t1-000", agent: str = "builtin", **over: object) -> AssignmentSpec:
        fields: dict[str, object] = {
            "assignment": assignment,
            "project": "demo",
            "trial": "t1",
            "machine": "m1",
            "task_id": "mathkit-basics",
            "repo": tmp_path / "repo",
            "prompt": "## Task\nImplement add.\n",
            "test_command": "python -m pytest -q",
            "fail_to_pass": ["tests/test_basic.py::test_add"],
            "pass_to_pass": [],
            "timeout_s": 60,
            "agent": agent,
            "model": "tiny",
            "endpoint": "http://127.0.0.1:9/v1",
            "env": {},
            "artifacts": tmp_path / "artifacts" / assignment,
            **over,
        }
        return AssignmentSpec.model_validate(fields)

    return make


def driver_for(double: NomadDouble, **cluster: object) -> NomadDriver:
    return NomadDriver(NomadCluster.model_validate({"address": double.url, **cluster}))


def sent(double: NomadDouble) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in double.requests]


# -- registration ------------------------------------------------------------------------------


def test_job_is_registered_once_and_not_again(double: NomadDouble, make_spec: MakeSpec) -> None:
    driver = driver_for(double)
    driver.launch(make_spec("t1-000"))
    driver.launch(make_spec("t1-001"))
    registers = [r for r in double.requests if r.path == "/v1/jobs"]
    assert len(registers) == 1
    body = registers[0].body
    assert body["EnforceIndex"] is True and body["JobModifyIndex"] == 0  # only if new
    assert body["Job"] == render_job("builtin", driver.cluster)
    assert body["Job"]["ID"] == "autovibe-worker-builtin"
    # A restarted orchestrator reads the job once, finds the same definition, registers nothing.
    double.requests.clear()
    driver_for(double).launch(make_spec("t1-002"))
    assert sent(double)[:2] == [
        ("GET", "/v1/job/autovibe-worker-builtin"),
        ("POST", "/v1/job/autovibe-worker-builtin/dispatch"),
    ]


def test_changed_definition_is_registered_check_and_set(
    double: NomadDouble, make_spec: MakeSpec
) -> None:
    driver_for(double).launch(make_spec("t1-000"))
    index = double.jobs["autovibe-worker-builtin"]["JobModifyIndex"]
    driver_for(double, memory_mb=8192).launch(make_spec("t1-001"))
    registers = [r.body for r in double.requests if r.path == "/v1/jobs"]
    assert len(registers) == 2
    assert registers[1]["JobModifyIndex"] == index and registers[1]["EnforceIndex"] is True
    job = double.jobs["autovibe-worker-builtin"]
    assert job["TaskGroups"][0]["Tasks"][0]["Resources"]["MemoryMB"] == 8192
    assert job["Version"] == 1


@pytest.mark.parametrize("racer_cpu", [4000, 3000])
def test_a_racing_registration_is_caught_by_check_and_set(
    double: NomadDouble, monkeypatch: pytest.MonkeyPatch, racer_cpu: int
) -> None:
    driver_for(double).ensure_job("builtin")
    ours = driver_for(double, cpu_mhz=4000)
    read = ours.client.job.get_job

    def read_then_someone_registers(job: str, **kw: object) -> object:
        answer = read(job, **kw)
        driver_for(double, cpu_mhz=racer_cpu).ensure_job("builtin")
        return answer

    monkeypatch.setattr(ours.client.job, "get_job", read_then_someone_registers)
    if racer_cpu == 4000:  # the other orchestrator registered our definition: fine
        assert ours.ensure_job("builtin") == "autovibe-worker-builtin"
    else:
        with pytest.raises(NomadError, match="conflicting job modify index"):
            ours.ensure_job("builtin")
    cpu = double.jobs["autovibe-worker-builtin"]["TaskGroups"][0]["Tasks"][0]["Resources"]["CPU"]
    assert cpu == racer_cpu  # never overwritten blindly


# -- dispatch ----------------------------------------------------------------------------------


def test_dispatch_is_the_documented_request(double: NomadDouble, make_spec: MakeSpec) -> None:
    spec = make_spec("t1-000")
    driver_for(double).launch(spec)
    (dispatch,) = [r for r in double.requests if r.path.endswith("/dispatch")]
    assert dispatch.method == "POST"
    assert dispatch.path == "/v1/job/autovibe-worker-builtin/dispatch"
    assert dispatch.query == {"idempotency_token": ["t1-000"]}
    assert set(dispatch.body) == {"Payload", "Meta", "IdPrefixTemplate"}
    assert dispatch.body["Meta"] == {"trial": "t1", "assignment": "t1-000", "machine": "m1"}
    assert dispatch.body["IdPrefixTemplate"] == "t1-000"
    payload = base64.b64decode(dispatch.body["Payload"])
    assert AssignmentSpec.model_validate_json(payload) == spec
    # The scheduler follows the assignment through spec.json in the shared data root.
    assert (spec.artifacts / "spec.json").read_bytes() == payload
    (child,) = double.children("autovibe-worker-builtin")
    assert child.startswith("autovibe-worker-builtin/dispatch-t1-000-")
    assert json.loads((spec.artifacts / RECORD).read_text())[0]["job"] == child


def test_restarted_orchestrator_never_dispatches_twice(
    double: NomadDouble, make_spec: MakeSpec
) -> None:
    spec = make_spec("t1-000")
    driver_for(double).launch(spec)
    (first,) = double.children("autovibe-worker-builtin")
    # Still going: a second launch (a scheduler retry) sends no dispatch at all.
    double.requests.clear()
    driver_for(double).launch(spec)
    assert not [r for r in double.requests if r.path.endswith("/dispatch")]
    # Died between Nomad's answer and our record: the retry sends the same token and Nomad
    # answers with the job it made the first time.
    (spec.artifacts / RECORD).unlink()
    double.requests.clear()
    driver_for(double).launch(spec)
    (again,) = [r for r in double.requests if r.path.endswith("/dispatch")]
    assert again.query == {"idempotency_token": ["t1-000"]}
    assert double.children("autovibe-worker-builtin") == [first]
    assert json.loads((spec.artifacts / RECORD).read_text())[0]["job"] == first


def test_redispatch_after_a_lost_run_takes_a_fresh_token(
    double: NomadDouble, make_spec: MakeSpec
) -> None:
    spec = make_spec("t1-000")
    driver = driver_for(double)
    driver.launch(spec)
    (first,) = double.children("autovibe-worker-builtin")
    double.place(first, "running")
    double.set_status(first, "lost")
    assert not driver.alive(spec)
    driver.launch(spec)  # the scheduler's next attempt
    tokens = [r.query["idempotency_token"] for r in double.requests if r.path.endswith("/dispatch")]
    assert tokens == [["t1-000"], ["t1-000.2"]]
    assert len(double.children("autovibe-worker-builtin")) == 2
    assert driver.status(spec).state == "queued"


def test_a_spec_over_nomads_payload_limit_is_refused_before_dispatch(
    double: NomadDouble, make_spec: MakeSpec
) -> None:
    spec = make_spec("t1-000", prompt="x" * 20_000)
    with pytest.raises(NomadError, match="limited to 16384"):
        driver_for(double).launch(spec)
    assert not double.requests
    assert isinstance(NomadError("x"), OSError)  # the scheduler records it as a launch failure


# -- liveness, states, cancel, logs ------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_status", "state", "alive"),
    [
        (None, "queued", True),  # dispatched, not placed yet
        ("pending", "running", True),
        ("running", "running", True),
        ("unknown", "running", True),
        ("complete", "finished", False),
        ("failed", "failed", False),
        ("lost", "failed", False),
    ],
)
def test_allocation_states_map_to_assignment_states(
    double: NomadDouble,
    make_spec: MakeSpec,
    client_status: str | None,
    state: str,
    alive: bool,
) -> None:
    spec = make_spec("t1-000")
    driver = driver_for(double)
    assert driver.status(spec).state == "none" and not driver.alive(spec)
    driver.launch(spec)
    (child,) = double.children("autovibe-worker-builtin")
    if client_status is not None:
        double.place(child)
        double.set_status(child, client_status, now_ns=1_000_000_000)  # long ago
    status = driver.status(spec)
    assert (status.state, driver.alive(spec)) == (state, alive)
    assert status.job == child and status.client_status == client_status


def test_complete_without_visible_result_waits_for_the_shared_file_system(
    double: NomadDouble, make_spec: MakeSpec
) -> None:
    spec = make_spec("t1-000")
    driver = driver_for(double)
    driver.launch(spec)
    (child,) = double.children("autovibe-worker-builtin")
    double.place(child, "running")
    double.set_status(child, "complete", now_ns=time.time_ns())
    assert driver.alive(spec)  # result.json not visible here yet
    spec.result_path.write_text("{}")
    assert not driver.alive(spec)


def test_cancel_stops_the_dispatched_job(double: NomadDouble, make_spec: MakeSpec) -> None:
    spec = make_spec("t1-000")
    driver = driver_for(double)
    driver.launch(spec)
    (child,) = double.children("autovibe-worker-builtin")
    double.place(child, "running")
    double.requests.clear()
    driver.cancel(spec)
    assert sent(double)[0] == ("DELETE", f"/v1/job/{child}")
    assert double.requests[0].body is None
    assert driver.status(spec).state == "cancelled" and not driver.alive(spec)
    assert double.jobs["autovibe-worker-builtin"]["Stop"] is False  # the parent job stays
    driver.cancel(spec)  # again, and for a job Nomad has forgotten: no error
    del double.jobs[child]
    driver.cancel(spec)


def test_logs_come_from_the_client_fs_endpoint(double: NomadDouble, make_spec: MakeSpec) -> None:
    spec = make_spec("t1-000")
    driver = driver_for(double)
    driver.launch(spec)
    assert driver.fetch_logs(spec) == ""  # not placed yet: nothing to read
    (child,) = double.children("autovibe-worker-builtin")
    alloc = double.place(child, "running")
    double.logs[(alloc, "runner", "stdout")] = "workspace ready\n"
    double.logs[(alloc, "runner", "stderr")] = "Traceback (most recent call last):\n"
    double.requests.clear()
    assert driver.fetch_logs(spec) == "workspace ready\n"
    assert driver.fetch_logs(spec, type="stderr").startswith("Traceback")
    logs = [r for r in double.requests if r.path.startswith("/v1/client/fs/logs/")]
    assert [r.path for r in logs] == [f"/v1/client/fs/logs/{alloc}"] * 2
    assert logs[0].query["task"] == ["runner"] and logs[0].query["type"] == ["stdout"]
    with pytest.raises(ValueError, match="allowed: stdout, stderr"):
        driver.fetch_logs(spec, type="both")


# -- ACLs, namespaces, errors ------------------------------------------------------------------


def test_token_and_namespace_go_with_every_request(
    double: NomadDouble, make_spec: MakeSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    double.token, double.namespace = "3f4a0fcd-1b9e-4c2a-9d0e-1a2b3c4d5e6f", "agents"
    monkeypatch.setenv("AUTOVIBE_TEST_NOMAD_TOKEN", double.token)
    driver = driver_for(double, namespace="agents", token_env="AUTOVIBE_TEST_NOMAD_TOKEN")
    spec = make_spec("t1-000")
    driver.launch(spec)
    (child,) = double.children("autovibe-worker-builtin")
    alloc = double.place(child, "running")
    driver.alive(spec)
    driver.fetch_logs(spec)
    driver.cancel(spec)
    assert {r.token for r in double.requests} == {double.token}
    assert all(r.query.get("namespace") == ["agents"] for r in double.requests)
    assert double.jobs["autovibe-worker-builtin"]["Namespace"] == "agents"
    assert alloc
    monkeypatch.setenv("AUTOVIBE_TEST_NOMAD_TOKEN", "not-the-token")
    with pytest.raises(NomadError, match="HTTP 403: Permission denied"):
        driver_for(double, namespace="agents", token_env="AUTOVIBE_TEST_NOMAD_TOKEN").launch(
            make_spec("t1-001")
        )


def test_unreachable_nomad_is_an_oserror(make_spec: MakeSpec) -> None:
    from contracts.settings import free_port

    driver = NomadDriver(NomadCluster(address=f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(OSError, match="nomad: read autovibe-worker-builtin"):
        driver.launch(make_spec("t1-000"))


def test_the_cluster_is_the_servers_and_the_trial_only_places_its_workers(
    demo_trial: dict[str, object], double: NomadDouble, make_spec: MakeSpec
) -> None:
    settings = Settings(
        nomad_address=double.url,
        nomad_jobs={"builtin": "workers-builtin"},
        nomad_node_pools=["default", "gpu"],
        nomad_datacenters=["dc1", "dc2"],
    )
    context = Catalog.load(settings).validation_context()
    placed = {"node_pool": "gpu", "datacenters": ["dc1"], "cpu_mhz": 2000}
    config = TrialConfig.model_validate(
        {**demo_trial, "driver": "nomad", "nomad": placed}, context=context
    )
    cluster = cluster_for(settings, config.nomad)
    assert (cluster.address, cluster.node_pool, cluster.datacenters) == (
        double.url,
        "gpu",
        ["dc1"],
    )
    driver = get_driver(config.driver, cluster)
    assert isinstance(driver, NomadDriver) and driver.cluster.cpu_mhz == 2000
    driver.launch(make_spec("t1-000"))
    job = double.jobs["workers-builtin"]
    assert (job["NodePool"], job["Datacenters"]) == ("gpu", ["dc1"])
    defaults = cluster_for(settings, None)
    assert (defaults.node_pool, defaults.datacenters) == ("default", ["dc1", "dc2"])
    with pytest.raises(ValueError, match="token"):
        TrialConfig.model_validate({**demo_trial, "nomad": {"token": "s3cr3t"}})


# -- live: a real Nomad agent ------------------------------------------------------------------


@pytest.fixture
def live(tmp_path: Path) -> Iterator[NomadDriver]:
    """A driver on the Nomad at NOMAD_ADDR; its clients must run raw_exec and see this
    machine's paths (a dev agent here: `nomad agent -dev`), and have this interpreter."""
    if not os.environ.get("NOMAD_ADDR"):
        pytest.skip("set NOMAD_ADDR (and NOMAD_TOKEN with ACLs) to run against a real Nomad")
    agent = f"live{os.getpid()}"
    driver = NomadDriver(NomadCluster(python=sys.executable, cpu_mhz=100, memory_mb=256))
    yield driver
    job = driver.ensure_job(agent)
    driver.client.job.deregister_job(job, purge=True)


def wait_until(check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.live
def test_live_register_once_dispatch_once_run_to_the_end(
    live: NomadDriver, make_spec: MakeSpec
) -> None:
    agent = f"live{os.getpid()}"
    # The repo does not exist: the runner fails fast, writes an infra_error result, exits 1.
    spec = make_spec(f"live-{os.getpid()}", agent=agent, repo=Path("/nonexistent/repo"))
    job = live.ensure_job(agent)
    index = live.client.job.get_job(job)["JobModifyIndex"]
    live.launch(spec)
    (spec.artifacts / RECORD).unlink()  # as if we died before recording the dispatch
    live.launch(spec)
    assert live.client.job.get_job(job)["JobModifyIndex"] == index  # not registered again
    records = json.loads((spec.artifacts / RECORD).read_text())
    assert len(records) == 1
    wait_until(lambda: not live.alive(spec))
    assert json.loads(spec.result_path.read_text())["infra_error"]
    assert live.status(spec).state == "failed"
    assert "Traceback" in live.fetch_logs(spec, type="stderr")
    children = [j for j in live.client.jobs.get_jobs(prefix=f"{job}/") if j.get("ParentID") == job]
    assert len(children) == 1


@pytest.mark.live
def test_live_cancel_stops_the_run(live: NomadDriver, make_spec: MakeSpec) -> None:
    agent = f"live{os.getpid()}"
    spec = make_spec(f"live-c-{os.getpid()}", agent=agent, repo=Path("/nonexistent/repo"))
    live.launch(spec)
    live.cancel(spec)
    wait_until(lambda: not live.alive(spec))
    assert live.status(spec).state in ("cancelled", "failed")

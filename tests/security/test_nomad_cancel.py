"""Cancel on Nomad stops the assignment's own job, never one named by a file a worker can
write (issue 17, finding 5).

The dispatch record lies in the assignment's folder of the shared data root, which every Nomad
client writes. A worker that rewrites it (another assignment's job, the parameterized job, a
service of the cluster's own) must not make the orchestrator stop those with its token: the
driver acts only on a job Nomad itself says is a dispatch of this assignment. Real python-nomad
against the documented-API stand-in (Nomad cannot run here).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.config import NomadCluster
from tests.security.spec_harness import plain_spec
from tests.workers.nomad_harness import NomadDouble
from workers.nomad import RECORD, NomadDriver, job_id
from workers.spec import AssignmentSpec

PARENT = job_id("builtin", NomadCluster())


@pytest.fixture
def double() -> Iterator[NomadDouble]:
    nomad = NomadDouble()
    nomad.start()
    yield nomad
    nomad.stop()
    assert not nomad.violations, "\n".join(nomad.violations)


def spec(tmp_path: Path, assignment: str) -> AssignmentSpec:
    return plain_spec(assignment, tmp_path / "artifacts" / assignment, tmp_path / "repo")


def dispatched(double: NomadDouble, assignment: str) -> str:
    (job,) = (
        j for j in double.children(PARENT) if double.jobs[j]["Meta"]["assignment"] == assignment
    )
    return job


def deleted(double: NomadDouble) -> list[str]:
    return [r.path.removeprefix("/v1/job/") for r in double.requests if r.method == "DELETE"]


def test_a_rewritten_record_stops_only_the_assignments_own_job(
    double: NomadDouble, tmp_path: Path
) -> None:
    cluster = NomadCluster(address=double.url)
    mine, other = spec(tmp_path, "t1-000"), spec(tmp_path, "t1-001")
    NomadDriver(cluster).launch(mine)
    NomadDriver(cluster).launch(other)
    my_job, other_job = dispatched(double, "t1-000"), dispatched(double, "t1-001")
    for job in (my_job, other_job):
        double.place(job, "running")
    # A service of the cluster's own, even one whose meta names this assignment.
    NomadDriver(cluster).client.jobs.register_job(
        {
            "Job": {
                "ID": "web",
                "Name": "web",
                "Type": "service",
                "Datacenters": ["dc1"],
                "Meta": {"assignment": "t1-000"},
                "TaskGroups": [
                    {"Name": "web", "Tasks": [{"Name": "web", "Driver": "exec", "Config": {}}]}
                ],
            }
        }
    )
    record = mine.artifacts / RECORD
    forged = json.loads(record.read_text())
    forged += [{"token": "x", "job": job, "at": 0} for job in (other_job, PARENT, "web")]
    record.write_text(json.dumps(forged))
    double.requests.clear()
    driver = NomadDriver(cluster)  # as after an orchestrator restart: it knows no job
    assert driver.status(mine).job == my_job  # not the last job the record names
    driver.cancel(mine)
    assert deleted(double) == [my_job]
    assert driver.status(other).state == "running"
    assert not double.jobs[PARENT]["Stop"] and not double.jobs["web"]["Stop"]


def test_a_record_replaced_by_a_link_is_not_followed_and_stops_nothing(
    double: NomadDouble, tmp_path: Path
) -> None:
    cluster = NomadCluster(address=double.url)
    mine, other = spec(tmp_path, "t1-000"), spec(tmp_path, "t1-001")
    NomadDriver(cluster).launch(mine)
    NomadDriver(cluster).launch(other)
    record = mine.artifacts / RECORD
    record.unlink()
    os.symlink(other.artifacts / RECORD, record)
    double.requests.clear()
    driver = NomadDriver(cluster)
    driver.cancel(mine)
    assert deleted(double) == []
    assert driver.status(mine).state == "failed"  # its record is gone: the run is lost
    assert driver.status(other).state == "queued"

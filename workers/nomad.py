"""Nomad worker driver: each assignment is one dispatch of a parameterized batch job.

One parameterized batch job per agent kind (`autovibe-worker-<agent>`, rendered from
nomad-jobs/autovibe-worker.json) is registered once, and again only when its definition
changes (check-and-set on JobModifyIndex). Each assignment is one dispatch: the payload is the
AssignmentSpec as JSON (Nomad writes it to the task's `local/spec.json`), the meta names trial,
assignment and machine, and the idempotency token is the assignment id, so an orchestrator that
dies mid-dispatch and retries never starts a second runner. The task runs the same
`python -m workers.runner` as the local driver.

Assumption — the data root is shared: it is mounted at the same path on the orchestrator and
on every Nomad client (NFS or a host volume), and so are the task repositories and the proxy's
CA certificate that the spec names. The runner writes its lock, artifacts and `result.json`
there, last, exactly as under the local driver, and the scheduler collects results from there;
Nomad only tells it whether a runner is still going. Retries belong to the scheduler: the job
disables Nomad's restarts and rescheduling, and a re-dispatch after a lost run uses a fresh
token (`<assignment>.2`, ...).

The record of an assignment's dispatches (`nomad-dispatch.json`) lies in its artifacts folder,
which the Nomad clients write too: it only names candidates. A job is acted on (status, logs,
stop) only once Nomad itself says it is a dispatch of the agent's parameterized job with this
assignment in its meta, which the orchestrator set when it dispatched it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import nomad
import nomad.api.exceptions as nomad_errors
from pydantic import BaseModel, TypeAdapter

from contracts.config import NomadCluster, NomadPlacement
from contracts.dataroot import atomic_write, read_untrusted
from contracts.settings import PROJECT_ROOT, Settings
from workers.spec import AssignmentSpec

log = logging.getLogger(__name__)

JOB_TEMPLATE = PROJECT_ROOT / "nomad-jobs" / "autovibe-worker.json"
TASK = "runner"
"""Name of the task that runs `workers.runner` in the job (the one whose logs are fetched)."""
PAYLOAD_LIMIT = 16 * 1024
"""Nomad refuses dispatch payloads larger than 16 KiB."""
RESULT_GRACE_S = 60.0
"""How long a run that Nomad reports complete counts as alive while its result.json is not yet
visible here (attribute caching of the shared file system)."""
DEFINITION_META = "autovibe_definition"
"""Job meta key holding a hash of the job as we render it: equal hash, no re-registration."""
RECORD = "nomad-dispatch.json"
"""Per-assignment record of its dispatches, beside spec.json in the artifacts folder."""
RECORD_LIMIT = 1 << 20
"""Most bytes read of a record; a larger one is cut short and so fails to parse."""


class Dispatch(BaseModel):
    """One dispatch of an assignment, as the driver recorded it."""

    token: str
    """The idempotency token it was dispatched with."""
    job: str
    """The dispatched job's ID, as Nomad answered."""
    at: float


_DISPATCHES = TypeAdapter(list[Dispatch])

ALLOCATION_STATES = {
    "pending": "running",
    "running": "running",
    "unknown": "running",  # client disconnected; Nomad may still hear from it
    "complete": "finished",
    "failed": "failed",
    "lost": "failed",
}
"""Nomad allocation ClientStatus → assignment state."""
_PREFIX_OK = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class NomadError(OSError):
    """Nomad refused a request or could not be reached; the message names the request."""


@dataclass(frozen=True)
class WorkerStatus:
    """What Nomad says about one assignment's latest dispatch."""

    state: str
    """Assignment state: queued (not placed yet), running, finished, failed, cancelled, or
    `none` when the assignment was never dispatched."""
    job: str | None = None
    """Dispatched (child) job ID."""
    allocation: str | None = None
    """ID of the latest allocation, once placed."""
    client_status: str | None = None
    """Nomad's ClientStatus of that allocation."""
    modify_time: float | None = None
    """When Nomad last changed that allocation (Unix seconds)."""


def cluster_for(settings: Settings, placement: NomadPlacement | None = None) -> NomadCluster:
    """The cluster of the server's settings, with the node pool, datacenters and resources a
    trial chose among what they allow (checked when the trial was submitted)."""
    placement = placement or NomadPlacement()
    return NomadCluster(
        address=settings.nomad_address,
        namespace=settings.nomad_namespace,
        region=settings.nomad_region,
        node_pool=placement.node_pool or settings.nomad_node_pools[0],
        datacenters=placement.datacenters or settings.nomad_datacenters,
        token_env=settings.nomad_token_env,
        jobs=settings.nomad_jobs,
        python=settings.nomad_python,
        cpu_mhz=placement.cpu_mhz,
        memory_mb=placement.memory_mb,
    )


def job_id(agent: str, cluster: NomadCluster) -> str:
    return cluster.jobs.get(agent, f"autovibe-worker-{agent}")


def _tojson(value: Any) -> str:
    if isinstance(value, jinja2.Undefined):
        str(value)  # StrictUndefined raises UndefinedError naming the variable
    return json.dumps(value)


def job_template() -> jinja2.Template:
    """nomad-jobs/autovibe-worker.json; a missing variable fails loudly (StrictUndefined)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)
    env.filters["tojson"] = _tojson  # the built-in one would serialise an undefined value
    return env.from_string(JOB_TEMPLATE.read_text())


def render_job(agent: str, cluster: NomadCluster) -> dict[str, Any]:
    """The parameterized job for one agent kind, as the JSON the API takes (`Job`)."""
    text = job_template().render(
        job_id=job_id(agent, cluster),
        agent=agent,
        namespace=cluster.namespace or os.environ.get("NOMAD_NAMESPACE") or "default",
        region=cluster.region or os.environ.get("NOMAD_REGION") or "global",
        node_pool=cluster.node_pool,
        datacenters=cluster.datacenters,
        python=cluster.python,
        cpu_mhz=cluster.cpu_mhz,
        memory_mb=cluster.memory_mb,
    )
    job: dict[str, Any] = json.loads(text)
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]
    job["Meta"][DEFINITION_META] = digest
    return job


def client_for(cluster: NomadCluster) -> nomad.Nomad:
    """A python-nomad client; TLS is verified (against NOMAD_CACERT when set)."""
    return nomad.Nomad(
        address=cluster.address or os.environ.get("NOMAD_ADDR") or "http://127.0.0.1:4646",
        namespace=cluster.namespace,
        region=cluster.region,
        token=os.environ.get(cluster.token_env) or None,
        timeout=10,
        verify=os.environ.get("NOMAD_CACERT") or True,
    )


class NomadDriver:
    name = "nomad"

    def __init__(self, cluster: NomadCluster | None = None, client: nomad.Nomad | None = None):
        self.cluster = cluster or NomadCluster()
        self.client = client or client_for(self.cluster)
        self._registered: dict[str, str] = {}
        """Job ID → definition hash known to be registered (one check per process and job)."""
        self._dispatched: set[tuple[str, str]] = set()
        """(assignment, job) pairs known to be ours: dispatched or checked with Nomad."""

    # -- the WorkerDriver port -----------------------------------------------------------------
    def launch(self, spec: AssignmentSpec) -> None:
        spec.artifacts.mkdir(parents=True, exist_ok=True)
        payload = spec.model_dump_json(indent=2).encode()
        if len(payload) > PAYLOAD_LIMIT:
            raise NomadError(
                f"assignment {spec.assignment}: its spec is {len(payload)} bytes; Nomad dispatch "
                f"payloads are limited to {PAYLOAD_LIMIT} (shorten the task prompt)"
            )
        # The scheduler reads spec.json from the shared data root to follow the assignment.
        # 0600: the spec carries the machine's live proxy credential.
        atomic_write(spec.artifacts / "spec.json", payload, mode=0o600)
        parent = self.ensure_job(spec.agent)
        records = _read_records(spec)
        jobs = self._jobs(spec, records)
        if jobs and self._status(jobs[-1]).state in ("queued", "running"):
            return  # already dispatched and still going: never a second runner
        # Retried after a crash mid-dispatch: the same token, so Nomad answers with the job it
        # already made. A re-dispatch after a run that ended without a result: a fresh token.
        token = spec.assignment if not records else f"{spec.assignment}.{len(records) + 1}"
        body: dict[str, Any] = {
            "Payload": base64.b64encode(payload).decode(),
            "Meta": {"trial": spec.trial, "assignment": spec.assignment, "machine": spec.machine},
        }
        if _PREFIX_OK.match(spec.assignment):
            body["IdPrefixTemplate"] = spec.assignment
        # python-nomad's dispatch_job puts the token in the body as `idempotency_token`, which
        # Nomad ignores; the API takes it as the `idempotency_token` query parameter.
        answer = self._call(
            f"dispatch {parent}",
            self.client.job.request,
            parent,
            "dispatch",
            params={"idempotency_token": token},
            json=body,
            method="post",
        ).json()
        job = str(answer["DispatchedJobID"])
        self._dispatched.add((spec.assignment, job))
        records.append(Dispatch(token=token, job=job, at=time.time()))
        _write_records(spec, records)

    def alive(self, spec: AssignmentSpec) -> bool:
        status = self.status(spec)
        if status.state in ("queued", "running"):
            return True
        # Complete in Nomad but no result.json visible yet: the shared file system lags.
        return (
            status.state == "finished"
            and not spec.result_path.exists()
            and status.modify_time is not None
            and time.time() - status.modify_time < RESULT_GRACE_S
        )

    def cancel(self, spec: AssignmentSpec) -> None:
        """Stop the assignment's dispatched jobs (Nomad sends the runner SIGTERM, then SIGKILL
        after 30 s): only those Nomad says are this assignment's, whatever the record names."""
        try:
            records = _read_records(spec)
        except (OSError, ValueError) as exc:
            parent = job_id(spec.agent, self.cluster)
            log.warning(
                "assignment %s: its dispatch record is unreadable (%s); nothing stopped: its "
                "jobs are the dispatches of %s with meta assignment=%s",
                spec.assignment, exc, parent, spec.assignment,
            )  # fmt: skip
            return
        for job in self._jobs(spec, records):
            self._call(f"stop {job}", self.client.job.deregister_job, job, missing_ok=True)

    # -- beyond the port -----------------------------------------------------------------------
    def status(self, spec: AssignmentSpec) -> WorkerStatus:
        try:
            jobs = self._jobs(spec, _read_records(spec))
        except (OSError, ValueError):
            return WorkerStatus("failed")  # its record was replaced: that run is lost
        return self._status(jobs[-1]) if jobs else WorkerStatus("none")

    def fetch_logs(self, spec: AssignmentSpec, task: str = TASK, type: str = "stdout") -> str:
        """The task's stdout or stderr so far, from the client that ran the latest allocation."""
        if type not in ("stdout", "stderr"):
            raise ValueError(f"log type {type!r}; allowed: stdout, stderr")
        status = self.status(spec)
        if status.allocation is None:
            return ""
        text: str = self._call(
            f"logs of {status.allocation}",
            self.client.client.stream_logs.stream,
            status.allocation,
            task,
            type,
            plain=True,
        )
        return text

    def ensure_job(self, agent: str) -> str:
        """Register the agent's parameterized job unless Nomad has this definition already."""
        job = render_job(agent, self.cluster)
        jid, digest = job["ID"], job["Meta"][DEFINITION_META]
        if self._registered.get(jid) == digest:
            return str(jid)
        current = self._call(f"read {jid}", self.client.job.get_job, jid, missing_ok=True)
        if current is None or (current.get("Meta") or {}).get(DEFINITION_META) != digest:
            # Check-and-set: two orchestrators registering at once cannot overwrite each other
            # blindly; index 0 means "only if the job is new".
            index = 0 if current is None else int(current["JobModifyIndex"])
            body = {"Job": job, "EnforceIndex": True, "JobModifyIndex": index}
            try:
                self._call(f"register {jid}", self.client.jobs.register_job, body)
            except NomadError:
                again = self._call(f"read {jid}", self.client.job.get_job, jid)
                if (again.get("Meta") or {}).get(DEFINITION_META) != digest:
                    raise
        self._registered[jid] = digest
        return str(jid)

    # -- internals -----------------------------------------------------------------------------
    def _jobs(self, spec: AssignmentSpec, records: list[Dispatch]) -> list[str]:
        """The recorded jobs Nomad says are this assignment's, oldest first: a dispatch of the
        agent's parameterized job carrying the assignment in its meta. A job Nomad no longer
        knows is left out unless this driver dispatched or checked it itself."""
        parent = job_id(spec.agent, self.cluster)
        jobs = []
        for record in records:
            key = (spec.assignment, record.job)
            if key not in self._dispatched:
                found = self._call(
                    f"read {record.job}", self.client.job.get_job, record.job, missing_ok=True
                )
                if found is None or found.get("ParentID") != parent:
                    continue
                if (found.get("Meta") or {}).get("assignment") != spec.assignment:
                    continue
                self._dispatched.add(key)
            jobs.append(record.job)
        return jobs

    def _status(self, dispatched: str) -> WorkerStatus:
        allocs = self._call(
            f"allocations of {dispatched}",
            self.client.job.get_allocations,
            dispatched,
            missing_ok=True,
        )
        if allocs:
            latest = max(allocs, key=lambda a: a.get("CreateIndex", 0))
            client_status = latest.get("ClientStatus", "")
            state = ALLOCATION_STATES.get(client_status, "running")
            if latest.get("DesiredStatus") == "stop" and state != "running":
                state = "cancelled"
            modified = latest.get("ModifyTime")
            return WorkerStatus(
                state=state,
                job=dispatched,
                allocation=latest["ID"],
                client_status=client_status,
                modify_time=modified / 1e9 if modified else None,
            )
        job = self._call(f"read {dispatched}", self.client.job.get_job, dispatched, missing_ok=True)
        if job is None:
            return WorkerStatus("failed", job=dispatched)  # gone (garbage-collected) unplaced
        if job.get("Status") == "dead":
            return WorkerStatus("cancelled" if job.get("Stop") else "failed", job=dispatched)
        return WorkerStatus("queued", job=dispatched)  # waiting for a client with room

    @staticmethod
    def _call(what: str, fn: Any, *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """Call python-nomad; a refusal or an unreachable Nomad becomes a NomadError (an
        OSError, which the scheduler records as a launch failure). With `missing_ok`, a 404
        answers None."""
        try:
            return fn(*args, **kwargs)
        except nomad_errors.URLNotFoundNomadException as exc:
            if missing_ok:
                return None
            raise NomadError(f"nomad: {what}: {_reason(exc)}") from exc
        except nomad_errors.BaseNomadException as exc:
            raise NomadError(f"nomad: {what}: {_reason(exc)}") from exc


def _reason(exc: nomad_errors.BaseNomadException) -> str:
    resp = exc.nomad_resp
    status = getattr(resp, "status_code", None)
    text = getattr(resp, "text", None)
    return f"HTTP {status}: {text.strip()}" if status is not None and text else str(resp)


def _record_path(spec: AssignmentSpec) -> Path:
    return spec.artifacts / RECORD


def read_records(artifacts: Path) -> list[Dispatch]:
    """The dispatches recorded in an assignment's folder ([] when none): never read through a
    symlink, at most `RECORD_LIMIT` bytes; `OSError` or `ValueError` when unreadable."""
    try:
        return _DISPATCHES.validate_json(
            read_untrusted(artifacts / RECORD, artifacts, RECORD_LIMIT)
        )
    except FileNotFoundError:
        return []


def _read_records(spec: AssignmentSpec) -> list[Dispatch]:
    return read_records(spec.artifacts)


def _write_records(spec: AssignmentSpec, records: list[Dispatch]) -> None:
    path = _record_path(spec)
    atomic_write(path, _DISPATCHES.dump_json(records, indent=2))

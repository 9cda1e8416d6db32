"""A stand-in for Nomad's documented HTTP API (jobs, dispatch, allocations, logs), for contract
tests.

Nomad cannot run here. This server accepts only the requests the driver is documented to
make — method, path, query parameters, `X-Nomad-Token`, JSON body shape — records each one,
and answers with the documented response JSON (fixtures/nomad/*.json, shaped after
developer.hashicorp.com/nomad/api-docs: jobs, allocations, client). It keeps Nomad's semantics
where the driver relies on them: check-and-set registration (EnforceIndex), dispatch validation
(required payload ≤ 16 KiB, exactly the required meta keys) and the idempotency token (a
second dispatch with the same token answers with the job made the first time). Allocations do
not run: tests place them and move them through their states with `place` and `set_status`.
Anything else is a contract violation: answered 400 and listed in `violations`.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

from tests.http_double import HttpDouble, JsonRequest, read_json, reply

FIXTURES = Path(__file__).parent / "fixtures" / "nomad"
PAYLOAD_LIMIT = 16 * 1024
GO_BOOLS = {"1", "t", "T", "TRUE", "true", "True", "0", "f", "F", "FALSE", "false", "False"}
"""What Go's strconv.ParseBool accepts (how Nomad reads boolean query parameters)."""
JOB_KEYS = {"ID", "Name", "Type", "Datacenters", "TaskGroups"}
"""Fields every job the driver registers must carry (json-jobs.mdx: the API job format)."""

Answer = tuple[int, Any]


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@dataclass
class NomadDouble(HttpDouble):
    methods: ClassVar[tuple[str, ...]] = ("GET", "POST", "PUT", "DELETE", "PATCH")
    token: str | None = None
    """When set, every request must carry it as X-Nomad-Token (ACLs enabled)."""
    namespace: str = "default"
    """When not `default`, every job request must name it (?namespace=)."""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    allocations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Dispatched job ID → its allocations (placed by the tests)."""
    logs: dict[tuple[str, str, str], str] = field(default_factory=dict)
    """(allocation, task, stdout|stderr) → the log text."""
    requests: list[JsonRequest] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    index: int = 100
    """Raft index: every write takes the next one."""

    # -- what a Nomad client would do ----------------------------------------------------------

    def children(self, parent: str) -> list[str]:
        return [j for j, job in self.jobs.items() if job.get("ParentID") == parent]

    def place(self, job_id: str, client_status: str = "pending") -> str:
        """The scheduler places the dispatched job: one allocation, on some node."""
        alloc = copy.deepcopy(fixture("job_allocations")[0])
        job = self.jobs[job_id]
        task = job["TaskGroups"][0]["Tasks"][0]["Name"]
        alloc.update(
            ID=str(uuid.uuid4()),
            EvalID=str(uuid.uuid4()),
            Name=f"{job_id}.{job['TaskGroups'][0]['Name']}[0]",
            JobID=job_id,
            TaskGroup=job["TaskGroups"][0]["Name"],
            TaskStates={task: alloc["TaskStates"].pop("redis")},
            CreateIndex=self._next(),
        )
        self.allocations.setdefault(job_id, []).append(alloc)
        self.set_status(job_id, client_status)
        return str(alloc["ID"])

    def set_status(self, job_id: str, client_status: str, now_ns: int | None = None) -> None:
        """The client reports the latest allocation's state (pending, running, complete, …)."""
        alloc = self.allocations[job_id][-1]
        alloc["ClientStatus"] = client_status
        alloc["ModifyIndex"] = self._next()
        if now_ns is not None:
            alloc["ModifyTime"] = now_ns
        for state in alloc["TaskStates"].values():
            state["State"] = {"pending": "pending", "running": "running"}.get(client_status, "dead")
            state["Failed"] = client_status in ("failed", "lost")
        terminal = client_status in ("complete", "failed", "lost")
        self.jobs[job_id]["Status"] = "dead" if terminal else "running"

    # -- routing -------------------------------------------------------------------------------

    def _next(self) -> int:
        self.index += 1
        return self.index

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        req = read_json(h, "X-Nomad-Token", keep_blank_values=True)
        self.requests.append(req)
        status, answer = self._route(req)
        if isinstance(answer, str):
            data, kind = answer.encode(), "text/plain; charset=utf-8"
        else:
            data, kind = json.dumps(answer).encode(), "application/json"
        index = [("X-Nomad-Index", str(self.index))] if status == 200 else []
        reply(h, status, data, kind, index)

    def _violation(self, req: JsonRequest, why: str) -> Answer:
        self.violations.append(f"{req.method} {req.path}: {why}")
        return 400, f"contract violation: {why}"

    def _query(
        self, req: JsonRequest, allowed: set[str], required: frozenset[str] = frozenset()
    ) -> str:
        """Why the query string is wrong, or ''."""
        names = set(req.query)
        if names - allowed - {"namespace", "region"}:
            return f"unknown query parameters {sorted(names - allowed)}"
        if required - names:
            return f"missing query parameters {sorted(required - names)}"
        if any(len(v) != 1 for v in req.query.values()):
            return "a query parameter given twice"
        if self.namespace != "default" and req.query.get("namespace") != [self.namespace]:
            return f"namespace must be given as ?namespace={self.namespace}"
        return ""

    def _route(self, req: JsonRequest) -> Answer:
        if self.token is not None and req.token != self.token:
            return 403, "Permission denied"
        if self.token is None and req.token is not None:
            return self._violation(req, "X-Nomad-Token sent to a Nomad without ACLs")
        path = req.path
        if path == "/v1/jobs":
            if req.method != "POST":
                return self._violation(req, "only POST /v1/jobs (register) is used")
            return self._register(req)
        if path.startswith("/v1/client/fs/logs/"):
            return self._logs(req, path.removeprefix("/v1/client/fs/logs/"))
        if not path.startswith("/v1/job/"):
            return self._violation(req, "not a documented job, allocation or logs endpoint")
        rest = path.removeprefix("/v1/job/")
        # Nomad routes on the suffix: dispatched job IDs contain a slash themselves.
        if rest.endswith("/dispatch") and req.method in ("POST", "PUT"):
            return self._dispatch(req, rest.removesuffix("/dispatch"))
        if rest.endswith("/allocations"):
            return self._allocations(req, rest.removesuffix("/allocations"))
        if req.method == "GET":
            return self._read(req, rest)
        if req.method == "DELETE":
            return self._deregister(req, rest)
        return self._violation(req, f"{req.method} /v1/job/:job_id is not used here")

    # -- endpoints -----------------------------------------------------------------------------

    def _register(self, req: JsonRequest) -> Answer:
        if why := self._query(req, set()):
            return self._violation(req, why)
        body = req.body
        if not isinstance(body, dict) or not isinstance(body.get("Job"), dict):
            return self._violation(req, f'register body must be {{"Job": {{...}}}}: {body!r:.200}')
        if set(body) - {"Job", "EnforceIndex", "JobModifyIndex"}:
            return self._violation(req, f"unexpected register fields {sorted(set(body))}")
        job = body["Job"]
        if missing := JOB_KEYS - set(job):
            return self._violation(req, f"job lacks {sorted(missing)}")
        for group in job["TaskGroups"]:
            for task in group.get("Tasks") or []:
                if not {"Name", "Driver", "Config"} <= set(task):
                    return self._violation(req, f"task lacks Name/Driver/Config: {task}")
        if job.get("Namespace", "default") != self.namespace:
            return self._violation(req, f"job namespace {job.get('Namespace')!r}")
        current = self.jobs.get(job["ID"])
        if body.get("EnforceIndex"):
            have = 0 if current is None else current["JobModifyIndex"]
            want = body.get("JobModifyIndex", 0)
            if want != have:
                what = "job exists with conflicting job modify index" if have else "job not found"
                return 500, f"Enforcing job modify index {want}: {what}: {have}"
        stored = {**fixture("job_read"), **copy.deepcopy(job)}
        stored.update(
            ParentID="",
            Dispatched=False,
            Stop=False,
            Status="running" if job.get("ParameterizedJob") else "pending",
            Version=0 if current is None else current["Version"] + 1,
            CreateIndex=self._next() if current is None else current["CreateIndex"],
        )
        stored["ModifyIndex"] = stored["JobModifyIndex"] = self._next()
        self.jobs[job["ID"]] = stored
        answer = fixture("job_register")
        answer.update(JobModifyIndex=stored["JobModifyIndex"], Index=stored["ModifyIndex"])
        return 200, answer

    def _read(self, req: JsonRequest, job_id: str) -> Answer:
        if why := self._query(req, set()):
            return self._violation(req, why)
        if req.body is not None:
            return self._violation(req, "read takes no body")
        if job_id not in self.jobs:
            return 404, "job not found"
        return 200, self.jobs[job_id]

    def _dispatch(self, req: JsonRequest, job_id: str) -> Answer:
        if why := self._query(req, {"idempotency_token"}):
            return self._violation(req, why)
        body = req.body
        if not isinstance(body, dict) or set(body) - {"Payload", "Meta", "IdPrefixTemplate"}:
            return self._violation(req, f"dispatch body is Payload, Meta, IdPrefixTemplate: {body}")
        if "idempotency_token" in body or "IdempotencyToken" in body:
            return self._violation(req, "the idempotency token is a query parameter")
        meta = body.get("Meta") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            return self._violation(req, f"Meta must map strings to strings: {meta}")
        try:
            payload = base64.b64decode(body.get("Payload") or "", validate=True)
        except (binascii.Error, ValueError):
            return self._violation(req, "Payload must be base64")
        parent = self.jobs.get(job_id)
        if parent is None:
            return 500, "parameterized job not found"
        spec = parent.get("ParameterizedJob")
        if not spec:
            return 500, f'Specified job "{job_id}" is not a parameterized job'
        if spec.get("Payload") == "required" and not payload:
            return 500, "Payload is not provided but required by parameterized job"
        if len(payload) > PAYLOAD_LIMIT:
            return 500, f"Payload exceeds maximum size; {len(payload)} > {PAYLOAD_LIMIT}"
        allowed = set(spec.get("MetaRequired") or []) | set(spec.get("MetaOptional") or [])
        if set(meta) - allowed:
            return 500, f"Dispatch request included unpermitted metadata keys: {sorted(meta)}"
        if set(spec.get("MetaRequired") or []) - set(meta):
            return 500, "Dispatch did not provide required meta keys"
        token = (req.query.get("idempotency_token") or [""])[0]
        if token:
            for child_id in self.children(job_id):
                child = self.jobs[child_id]
                if child["DispatchIdempotencyToken"] == token:
                    return 200, {
                        "Index": child["ModifyIndex"],
                        "JobCreateIndex": child["CreateIndex"],
                        "EvalCreateIndex": 0,
                        "EvalID": "",
                        "DispatchedJobID": child_id,
                    }
        prefix = f"{body['IdPrefixTemplate']}-" if body.get("IdPrefixTemplate") else ""
        child_id = f"{job_id}/dispatch-{prefix}{1485408778 + self.index}-{uuid.uuid4().hex[:8]}"
        child = copy.deepcopy(parent)
        child.update(
            ID=child_id,
            Name=child_id,
            ParentID=job_id,
            Dispatched=True,
            DispatchIdempotencyToken=token,
            Status="pending",
            Meta={**(parent.get("Meta") or {}), **meta},
            Payload=body["Payload"],
            CreateIndex=self._next(),
        )
        child["ModifyIndex"] = child["JobModifyIndex"] = child["CreateIndex"]
        self.jobs[child_id] = child
        answer = fixture("job_dispatch")
        answer.update(
            Index=self._next(),
            JobCreateIndex=child["CreateIndex"],
            EvalCreateIndex=self.index,
            EvalID=str(uuid.uuid4()),
            DispatchedJobID=child_id,
        )
        return 200, answer

    def _allocations(self, req: JsonRequest, job_id: str) -> Answer:
        if req.method != "GET":
            return self._violation(req, "allocations are read with GET")
        if why := self._query(req, {"all"}):
            return self._violation(req, why)
        if job_id not in self.jobs:
            return 200, []  # Nomad lists nothing for an unknown job
        return 200, self.allocations.get(job_id, [])

    def _deregister(self, req: JsonRequest, job_id: str) -> Answer:
        if why := self._query(req, {"purge", "global", "eval_priority", "no_shutdown_delay"}):
            return self._violation(req, why)
        if req.body is not None:
            return self._violation(req, "stop takes no body")
        job = self.jobs.get(job_id)
        if job is None:
            return 404, "job not found"
        job.update(Stop=True, Status="dead", JobModifyIndex=self._next())
        for alloc in self.allocations.get(job_id, []):
            alloc["DesiredStatus"] = "stop"
            if alloc["ClientStatus"] in ("pending", "running"):
                alloc["ClientStatus"] = "complete"  # the client kills the task
        answer = fixture("job_deregister")
        answer.update(JobModifyIndex=job["JobModifyIndex"], EvalCreateIndex=self._next())
        return 200, answer

    def _logs(self, req: JsonRequest, alloc_id: str) -> Answer:
        if req.method != "GET":
            return self._violation(req, "logs are read with GET")
        allowed = {"task", "type", "follow", "offset", "origin", "plain"}
        if why := self._query(req, allowed, required=frozenset({"task", "type"})):
            return self._violation(req, why)
        q = {k: v[0] for k, v in req.query.items()}
        if q["type"] not in ("stdout", "stderr"):
            return 400, "must provide log type (stdout or stderr)"
        for name in ("follow", "plain"):
            if name in q and q[name] not in GO_BOOLS:
                return 400, f"failed to parse {name} field to boolean"
        if q.get("origin", "start") not in ("start", "end"):
            return 400, "origin must be start or end"
        if not q.get("offset", "0").isdigit():
            return 400, "failed to parse offset field to integer"
        if q.get("follow", "false").lower() in ("1", "t", "true"):
            return self._violation(req, "the driver reads logs so far, never follows")
        if q.get("plain", "false").lower() not in ("1", "t", "true"):
            return self._violation(req, "the driver reads plain text, not framed JSON")
        if not any(a["ID"] == alloc_id for allocs in self.allocations.values() for a in allocs):
            return 404, f'Unknown allocation "{alloc_id}"'
        return 200, self.logs.get((alloc_id, q["task"], q["type"]), "")

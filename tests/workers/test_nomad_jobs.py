"""nomad-jobs/: the HCL job people read and the JSON job the driver sends describe one job.

No HCL parser is installed, so a small reader for the subset the file uses (blocks with labels,
attributes, strings, numbers, booleans, lists, `var.x` references) turns the HCL into the API's
JSON job; it must equal what `render_job` sends, field for field.
"""

from __future__ import annotations

import re
from typing import Any

import jinja2
import pytest

from contracts.config import NomadCluster
from contracts.settings import PROJECT_ROOT
from workers.nomad import DEFINITION_META, job_template, render_job

HCL = PROJECT_ROOT / "nomad-jobs" / "autovibe-worker.nomad.hcl"
TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]=,]|[A-Za-z0-9_.()\-]+')

Body = dict[str, Any]


def parse_hcl(text: str) -> Body:
    """Attributes → values; blocks → lists of bodies, each with its labels under `_labels`."""
    text = re.sub(r"(?m)^\s*#.*$", "", text)
    tokens = TOKEN.findall(text)
    pos = 0

    def value() -> Any:
        nonlocal pos
        tok = tokens[pos]
        pos += 1
        if tok == "[":
            items = []
            while tokens[pos] != "]":
                items.append(value())
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
            return items
        if tok.startswith('"'):
            return tok[1:-1]
        if tok in ("true", "false"):
            return tok == "true"
        if re.fullmatch(r"-?\d+", tok):
            return int(tok)
        return ("expr", tok)

    def body(end: str | None) -> Body:
        nonlocal pos
        out: Body = {}
        while pos < len(tokens) and tokens[pos] != end:
            name = tokens[pos]
            pos += 1
            if tokens[pos] == "=":
                pos += 1
                out[name] = value()
                continue
            labels = []
            while tokens[pos] != "{":
                labels.append(tokens[pos].strip('"'))
                pos += 1
            pos += 1
            block = body("}")
            pos += 1
            block["_labels"] = labels
            out.setdefault(name, []).append(block)
        return out

    return body(None)


def evaluate(job: Body, variables: dict[str, Any]) -> Any:
    """Resolve `var.x` references and `${var.x}` interpolations; leave `${NOMAD_*}` alone."""

    def ev(v: Any) -> Any:
        if isinstance(v, tuple) and v[0] == "expr" and v[1].startswith("var."):
            return variables[v[1].removeprefix("var.")]
        if isinstance(v, str):
            return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(variables[m.group(1)]), v)
        if isinstance(v, list):
            return [ev(x) for x in v]
        if isinstance(v, dict):
            return {k: ev(x) for k, x in v.items()}
        return v

    return ev(job)


def duration_ns(text: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(ns|us|ms|s|m|h)", text).groups()  # type: ignore[union-attr]
    scale = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    return int(number) * scale[unit]


def api_job(hcl: Body, **given: Any) -> Body:
    """The HCL job as the JSON job API (json-jobs.mdx names), for the fields the file uses."""
    variables = {v["_labels"][0]: v.get("default") for v in hcl["variable"]}
    variables.update(given)
    assert all(v is not None for v in variables.values()), variables
    (job,) = evaluate(hcl["job"], variables)
    (group,) = job["group"]
    (task,) = group["task"]
    (restart,), (reschedule,) = group["restart"], group["reschedule"]
    (parameterized,), (meta,) = job["parameterized"], job["meta"]
    (config,), (payload,), (env,) = task["config"], task["dispatch_payload"], task["env"]
    (resources,), (logs,) = task["resources"], task["logs"]
    strip = lambda d: {k: v for k, v in d.items() if k != "_labels"}  # noqa: E731
    return {
        "ID": job["id"],
        "Name": job["name"],
        "Type": job["type"],
        "Namespace": job["namespace"],
        "Region": job["region"],
        "NodePool": job["node_pool"],
        "Datacenters": job["datacenters"],
        "Meta": strip(meta),
        "ParameterizedJob": {
            "Payload": parameterized["payload"],
            "MetaRequired": parameterized["meta_required"],
            "MetaOptional": parameterized["meta_optional"],
        },
        "TaskGroups": [
            {
                "Name": group["_labels"][0],
                "Count": group["count"],
                "RestartPolicy": {"Attempts": restart["attempts"], "Mode": restart["mode"]},
                "ReschedulePolicy": {
                    "Attempts": reschedule["attempts"],
                    "Unlimited": reschedule["unlimited"],
                },
                "Tasks": [
                    {
                        "Name": task["_labels"][0],
                        "Driver": task["driver"],
                        "Config": strip(config),
                        "DispatchPayload": {"File": payload["file"]},
                        "Env": strip(env),
                        "KillTimeout": duration_ns(task["kill_timeout"]),
                        "Resources": {"CPU": resources["cpu"], "MemoryMB": resources["memory"]},
                        "LogConfig": {
                            "MaxFiles": logs["max_files"],
                            "MaxFileSizeMB": logs["max_file_size"],
                        },
                    }
                ],
            }
        ],
    }


def sent(agent: str, cluster: NomadCluster) -> Body:
    job = render_job(agent, cluster)
    del job["Meta"][DEFINITION_META]
    return job


def test_hcl_and_json_describe_the_same_job_with_defaults() -> None:
    hcl = parse_hcl(HCL.read_text())
    assert api_job(hcl, agent="builtin") == sent("builtin", NomadCluster())


def test_hcl_and_json_agree_for_every_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NOMAD_NAMESPACE", "NOMAD_REGION"):
        monkeypatch.delenv(name, raising=False)
    cluster = NomadCluster(
        namespace="agents",
        region="eu",
        node_pool="gpu",
        datacenters=["dc1", "dc2"],
        python="/opt/autovibe/.venv/bin/python",
        cpu_mhz=2500,
        memory_mb=8192,
    )
    hcl = parse_hcl(HCL.read_text())
    from_hcl = api_job(
        hcl,
        agent="aider",
        namespace="agents",
        region="eu",
        node_pool="gpu",
        datacenters=["dc1", "dc2"],
        python="/opt/autovibe/.venv/bin/python",
        cpu_mhz=2500,
        memory_mb=8192,
    )
    assert from_hcl == sent("aider", cluster)


def test_the_job_is_what_the_driver_needs() -> None:
    job = render_job("builtin", NomadCluster(jobs={"builtin": "workers-builtin"}))
    assert job["ID"] == "workers-builtin" and job["Type"] == "batch"
    assert job["ParameterizedJob"]["MetaRequired"] == ["assignment", "trial", "machine"]
    (task,) = job["TaskGroups"][0]["Tasks"]
    assert task["Config"]["args"] == ["-m", "workers.runner", "${NOMAD_TASK_DIR}/spec.json"]
    assert task["DispatchPayload"] == {"File": "spec.json"}  # written to local/ = NOMAD_TASK_DIR
    assert len(job["Meta"][DEFINITION_META]) == 16
    assert (
        render_job("builtin", NomadCluster(cpu_mhz=2000))["Meta"][DEFINITION_META]
        != (render_job("builtin", NomadCluster())["Meta"][DEFINITION_META])
    )


def test_a_missing_template_variable_fails_loudly() -> None:
    with pytest.raises(jinja2.UndefinedError, match="'python' is undefined"):
        job_template().render(
            job_id="j",
            agent="a",
            namespace="default",
            region="global",
            node_pool="default",
            datacenters=["*"],
            cpu_mhz=100,
            memory_mb=64,
        )

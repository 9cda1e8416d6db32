"""Control API (FastAPI): submit, list, inspect, follow and cancel trials."""

# No `from __future__ import annotations`: the submit route's body type holds a validator bound
# to its app's catalog, which FastAPI must read as an object, not as a name to look up.

import asyncio
import datetime as dt
import json
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidatorFunctionWrapHandler, WrapValidator
from sqlalchemy import Text, cast, select
from sqlalchemy.exc import IntegrityError

from contracts.config import TrialConfig
from contracts.intake import load_intake
from contracts.reports import TrialReport
from contracts.results import AssignmentResult
from contracts.settings import Settings
from orchestrator import access, auth, payments_api, report
from orchestrator.bandit import history_from_state
from orchestrator.intake import concierge
from orchestrator.intake import webhook as intake_webhook
from orchestrator.metrics import Metrics
from orchestrator.mirrors import Mirrors, RepoError, public_url
from orchestrator.planning import plan
from orchestrator.platform import Platform
from orchestrator.scheduler import Scheduler, cancel
from orchestrator.state import Assignment, Trial, stored_config, utcnow
from workers.agents import install as agent_install

log = logging.getLogger("autovibe.api")


def create_app(settings: Settings | None = None, *, run_scheduler: bool = True) -> FastAPI:
    settings = settings or Settings()
    platform = Platform.from_settings(settings)
    guard = auth.guard_for(platform.root, access.rate_limiter(settings, platform.root))
    cors_origins = access.check_cors_origins(settings.cors_origins)
    scheduler = Scheduler(platform)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if run_scheduler:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(
        title="autovibe control API",
        version="0.1.0",
        lifespan=lifespan,
        description="Submit trials (tasks × agents × model pairs, with budgets) and follow them.",
        # Every route, including routers added later, passes the guard (access.RULES).
        dependencies=[Depends(guard)],
    )
    app.add_middleware(access.AuditMiddleware, audit=access.AuditLog(platform.root))
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors_origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
        expose_headers=["Retry-After"],
    )
    app.state.platform = platform
    app.state.scheduler = scheduler

    guarded = [Depends(guard)]  # the same guard; FastAPI runs it once per request
    app.include_router(payments_api.router(platform, guard))
    intake = load_intake(settings.intake_config) if settings.intake_config else None
    app.include_router(intake_webhook.router(platform, intake))
    app.include_router(concierge.router(platform, intake.concierge if intake else None))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(platform), media_type=CONTENT_TYPE_LATEST)

    def with_server_limits(body: Any, _schema_only: ValidatorFunctionWrapHandler) -> TrialConfig:
        # FastAPI validates without a context; the server's limits (known agents and pairs,
        # task roots, sandbox, Nomad placement, webhook hosts, egress) are the catalog's.
        return TrialConfig.model_validate(body, context=platform.catalog.validation_context())

    @app.post("/v1/trials", status_code=201, dependencies=guarded)
    def submit(
        config: Annotated[TrialConfig, WrapValidator(with_server_limits), Body()],
    ) -> dict[str, Any]:
        check_trial(platform, config)
        pin_repos(platform, config)
        trial = Trial(
            id=new_trial_id(),
            name=config.name,
            project=config.project,
            config=config.model_dump(mode="json"),
        )
        history = (
            history_from_state(platform.store, config.budget.currency, platform.catalog.prices)
            if config.assignment.strategy == "bandit"
            else []
        )
        try:
            with platform.store.session() as s:
                if s.scalar(select(Trial.id).where(Trial.name == config.name)) is not None:
                    raise HTTPException(409, f"a trial named {config.name!r} exists already")
                s.add(trial)
                for p in plan(config, history):
                    s.add(
                        Assignment(
                            id=f"{trial.id}-{p.index:03d}",
                            trial_id=trial.id,
                            index=p.index,
                            task_id=p.task_id,
                            agent=p.agent,
                            model=p.model,
                        )
                    )
                s.flush()  # a racing duplicate name fails here, before the ledger is touched
                platform.store.add_event(s, trial.id, "trial_submitted", name=config.name)
                platform.open_ledger(config, trial.id)
        except IntegrityError as exc:
            raise HTTPException(409, f"a trial named {config.name!r} exists already") from exc
        metrics.trials.inc()
        return {"id": trial.id, "name": trial.name, "status": "queued"}

    @app.get("/v1/trials", dependencies=guarded)
    def list_trials() -> list[dict[str, Any]]:
        with platform.store.session() as s:
            trials = s.scalars(select(Trial).order_by(Trial.created_at.desc()))
            return [summary(t) for t in trials]

    @app.get("/v1/trials/{trial_id}", dependencies=guarded)
    def show(trial_id: str) -> dict[str, Any]:
        return trial_view(platform, trial_id)

    @app.get("/v1/trials/{trial_id}/report", dependencies=guarded)
    def trial_report(trial_id: str) -> TrialReport:
        trial_view(platform, trial_id)
        return report.build(platform, trial_id)

    @app.post("/v1/trials/{trial_id}/cancel", dependencies=guarded)
    def cancel_trial(trial_id: str) -> dict[str, Any]:
        trial_view(platform, trial_id)  # 404 when unknown
        cancel(platform, trial_id)
        return trial_view(platform, trial_id)

    @app.get("/v1/trials/{trial_id}/events", dependencies=guarded)
    async def events(trial_id: str, request: Request) -> StreamingResponse:
        trial_view(platform, trial_id)
        last = int(request.headers.get("last-event-id", "0") or 0)
        return StreamingResponse(
            event_stream(platform, trial_id, last, request), media_type="text/event-stream"
        )

    return app


def check_trial(platform: Platform, config: TrialConfig) -> None:
    """422 for what only this machine can tell of a valid trial: every task repo (known to lie
    under a task root) exists, every agent is installed, a transparent sandbox has its
    listener."""
    missing = [
        {
            "type": "path_missing",
            "loc": ("body", "tasks", i, "repo"),
            "msg": f"folder {t.repo} does not exist on the orchestrator's machine",
            "input": str(t.repo),
        }
        for i, t in enumerate(config.tasks)
        if isinstance(t.repo, Path) and not t.repo.is_dir()
    ]
    # Refused now, not as a failure mid-run: every agent must be installed on this machine.
    missing += [
        {
            "type": "agent_not_installed",
            "loc": ("body", "agents", i),
            "msg": agent_install.install_hint(name),
            "input": name,
        }
        for i, name in enumerate(config.agents)
        if not agent_install.is_installed(name, platform.root.root)
    ]
    if config.sandbox.network == "transparent" and not platform.settings.proxy_transparent_port:
        missing.append(
            {
                "type": "transparent_listener_missing",
                "loc": ("body", "sandbox", "network"),
                "msg": "`transparent` needs the proxy's transparent listener: start the stack "
                "with AUTOVIBE_PROXY_TRANSPARENT_PORT set (allowed: proxy, transparent)",
                "input": "transparent",
            }
        )
    if missing:
        raise RequestValidationError(missing)


def pin_repos(platform: Platform, config: TrialConfig) -> None:
    """Fetch every task repo named by URL into its mirror and pin the task to the full commit
    (a `ref` resolved now, once for the whole trial); 422 naming the task and the cause."""
    mirrors = Mirrors(platform.root)
    unusable = []
    for i, t in enumerate(config.tasks):
        if isinstance(t.repo, str):
            try:
                t.commit = mirrors.resolve(t.repo, t.commit, t.ref)
            except RepoError as exc:
                unusable.append(
                    {
                        "type": "repo_unusable",
                        "loc": ("body", "tasks", i, "repo"),
                        "msg": f"task {t.id}: {exc}",
                        "input": public_url(t.repo),
                    }
                )
    if unusable:
        raise RequestValidationError(unusable)


def new_trial_id() -> str:
    return "t" + utcnow().strftime("%y%m%d") + secrets.token_hex(3)


def summary(t: Trial) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "project": t.project,
        "status": t.status,
        "created_at": t.created_at.isoformat() + "Z",
        "finished_at": t.finished_at.isoformat() + "Z" if t.finished_at else None,
    }


_VIEWED = (
    Assignment.id,
    Assignment.task_id,
    Assignment.agent,
    Assignment.model,
    Assignment.state,
    Assignment.machine,
    Assignment.attempts,
    Assignment.not_before,
    Assignment.status,
    Assignment.exit_cause,
    # As its text: parsed by pydantic in one step, not by `json` and then validated.
    cast(Assignment.result, Text),
)
"""The columns a trial's view lists of each assignment."""


def trial_view(platform: Platform, trial_id: str) -> dict[str, Any]:
    with platform.store.session() as s:
        trial = s.get(Trial, trial_id)
        if trial is None:
            raise HTTPException(404, f"no trial {trial_id!r}")
        config = stored_config(trial.config)
        view = summary(trial)
        # Columns, not mapped rows: at fleet scale this lists 1,000 assignments several times a
        # second, in the process whose scheduler ticks.
        rows = s.execute(
            select(*_VIEWED).where(Assignment.trial_id == trial_id).order_by(Assignment.index)
        )
        view["assignments"] = [_assignment_view(*row) for row in rows]
    usd = sum((u.cost_usd for u in platform.usage(trial=trial_id)), start=Decimal(0))
    for a in view["assignments"]:
        if a["state"] == "running":
            # Indexed just above (`platform.usage`): the running ones' spend is only read.
            usage = platform.index.usage(assignment=a["id"])
            spent = sum((u.cost_usd for u in usage), start=Decimal(0))
            a["spend"] = str(platform.in_currency(spent, config.budget.currency))
    view["spend"] = {
        "amount": str(platform.in_currency(usd, config.budget.currency)),
        "currency": config.budget.currency,
        "usd": str(usd),
        "budget": str(config.budget.amount),
    }
    return view


async def event_stream(
    platform: Platform, trial_id: str, last: int, request: Request
) -> AsyncIterator[bytes]:
    """Server-Sent Events from the events table; ends after the trial's final event."""
    final = {"trial_finished", "trial_cancelled"}
    while True:
        rows = await asyncio.to_thread(platform.store.events_after, trial_id, last)
        for ev in rows:
            last = ev.id
            data = json.dumps({"ts": ev.ts.isoformat() + "Z", **ev.data})
            yield f"id: {ev.id}\nevent: {ev.kind}\ndata: {data}\n\n".encode()
            if ev.kind in final:
                return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.5)


def _assignment_view(
    assignment_id: str,
    task: str,
    agent: str,
    model: str,
    state: str,
    machine: str | None,
    attempts: int,
    not_before: dt.datetime | None,
    status: str | None,
    exit_cause: str | None,
    result: str | None,
) -> dict[str, Any]:
    """One assignment as a trial's view lists it, from its `_VIEWED` columns."""
    # No ending yet (queued, running; SQL or JSON null): the empty record `ending` reads.
    ending = None if result in (None, "null") else AssignmentResult.model_validate_json(result)
    return {
        "id": assignment_id,
        "task": task,
        "agent": agent,
        "model": model,
        "state": state,
        "machine": machine,
        "attempts": attempts,
        "not_before": not_before.isoformat() + "Z" if not_before else None,
        "status": status,
        "exit_cause": exit_cause,
        "cost": None if ending is None or ending.cost is None else str(ending.cost),
        "wall_s": None if ending is None else ending.wall_s,
        "confidence": None
        if ending is None or ending.confidence is None
        else ending.confidence.to_json(),
    }

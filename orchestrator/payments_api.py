"""Control API for money coming in and going out: `POST /v1/payments`, `POST /v1/revenue`, and
`GET /v1/projects/{project}/payments/{id}` (a payment's latest state).

Mounted by `create_app` with the API's own guard dependency. The guard returns who calls:
None (or an object whose `project` is None) for the operator, who may act for any project;
or a machine principal with `project` and `machine` attributes (a machine token, or a worker's
own machine credential), which may act only for its own project and as its own machine — the
project in the body must be its own (else 403), and its machine (from the token, not the body)
is charged the purchase; a machine principal without a machine may not pay (403).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse

from budget import CounterStore
from ledger.book import LedgerError
from ledger.payments import (
    PAYMENTS_FILE,
    Broker,
    PaymentError,
    PaymentPolicy,
    PaymentRequest,
    Requester,
    RevenueEvent,
    record_revenue,
)
from orchestrator.platform import Platform
from secretstore import store_from_env

_STATUS_CODES = {"completed": 201, "pending_approval": 202, "failed": 502}
_BUDGET_REASONS = {"project_budget", "machine_allowance", "no_budget_scope"}


class PaymentBody(PaymentRequest):
    project: str | None = None
    """Required on `/v1/payments`; on `/v1/projects/{project}/payments` the path names it."""
    machine: str | None = None
    """Charged machine, for the operator; a machine token's own machine is always used."""
    agent: str | None = None


class RevenueBody(RevenueEvent):
    project: str | None = None


def broker(platform: Platform) -> Broker:
    """The broker over the platform's data root, counters, fx rates and secret store."""
    counters: Callable[[], CounterStore] = platform.counters
    return Broker(
        platform.root,
        PaymentPolicy.load(platform.settings.configs / PAYMENTS_FILE),
        counters=counters,
        fx=platform.catalog.prices.fx,
        secrets=lambda: store_from_env(settings=platform.settings),
    )


def _acting(principal: Any, project: str, machine: str | None) -> tuple[str, str | None]:
    """(project, machine) the caller may act as; 403 when a machine reaches past its project."""
    own_project = getattr(principal, "project", None)
    # Only a machine is held to its project: another token's project is a label.
    if own_project is None or str(getattr(principal, "scope", "machine")) != "machine":
        return project, machine
    if own_project != project:
        raise HTTPException(403, f"a machine of project {own_project!r} cannot act for {project!r}")
    own_machine = getattr(principal, "machine", None)
    if own_machine is None:
        raise HTTPException(
            403, "this machine token names no machine; create one with --machine to pay"
        )
    if machine is not None and own_machine is not None and machine != own_machine:
        raise HTTPException(403, f"machine {own_machine!r} cannot pay as {machine!r}")
    return project, own_machine


def _project(in_path: str | None, in_body: str | None) -> str:
    if in_path is not None and in_body is not None and in_path != in_body:
        raise HTTPException(422, f"project {in_body!r} in the body is not {in_path!r} of the path")
    project = in_path or in_body
    if not project:
        raise HTTPException(422, "name the project: in the body, or /v1/projects/{project}/…")
    return project


def router(platform: Platform, guard: Callable[..., Any]) -> APIRouter:
    """The payments and revenue routes, every one behind the dependency `guard`."""
    api = APIRouter(tags=["money"])
    # A default, not `Annotated[…]`: annotations are strings here, and `guard` is a local name.
    caller = Depends(guard)

    @api.post("/v1/payments")
    def pay(body: PaymentBody, principal: Any = caller) -> JSONResponse:
        return pay_for(_project(None, body.project), body, principal)

    @api.post("/v1/projects/{project}/payments")
    def pay_in(project: str, body: PaymentBody, principal: Any = caller) -> JSONResponse:
        return pay_for(_project(project, body.project), body, principal)

    def pay_for(project: str, body: PaymentBody, principal: Any) -> JSONResponse:
        project, machine = _acting(principal, project, body.machine)
        request = PaymentRequest.model_validate(
            body.model_dump(exclude={"project", "machine", "agent"})
        )
        who = Requester(
            project,
            machine,
            body.agent,
            trial=getattr(principal, "trial", None),
            assignment=getattr(principal, "assignment", None),
        )
        entry = broker(platform).submit(request, who)
        if entry["status"] == "refused":
            code = 402 if entry["reason"] in _BUDGET_REASONS else 403
        else:
            code = _STATUS_CODES[entry["status"]]
        return JSONResponse(entry, status_code=code)

    @api.get("/v1/projects/{project}/payments/{payment_id}")
    def payment_state(project: str, payment_id: str, principal: Any = caller) -> JSONResponse:
        """A payment's latest state (a held one once the operator approved it); a machine
        sees only its own machine's payments."""
        project, machine = _acting(principal, project, None)
        try:
            history = broker(platform).history(payment_id, project=project)
        except PaymentError as exc:
            raise HTTPException(422, str(exc)) from exc
        latest = history[-1] if history else None
        if latest is None or (machine is not None and latest.get("machine") != machine):
            raise HTTPException(404, f"no payment {payment_id!r} of yours in {project!r}")
        return JSONResponse(latest)

    @api.post("/v1/revenue", status_code=201)
    def revenue(body: RevenueBody, principal: Any = caller) -> dict[str, Any]:
        return revenue_for(_project(None, body.project), body, principal)

    @api.post("/v1/projects/{project}/revenue", status_code=201)
    def revenue_in(project: str, body: RevenueBody, principal: Any = caller) -> dict[str, Any]:
        return revenue_for(_project(project, body.project), body, principal)

    def revenue_for(project: str, body: RevenueBody, principal: Any) -> dict[str, Any]:
        project, _ = _acting(principal, project, None)
        event = RevenueEvent.model_validate(body.model_dump(exclude={"project"}))
        try:
            revenue_id, posted = record_revenue(
                platform.root, project, event, platform.catalog.prices.fx
            )
        except (LedgerError, KeyError) as exc:
            raise HTTPException(409, str(exc)) from exc
        return {"id": revenue_id, "project": project, "posted": posted}

    return api

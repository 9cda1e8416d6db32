"""`POST /v1/intake/github`: GitHub's webhook deliveries, as an alternative to polling.

No API token: GitHub signs each delivery with the shared secret (`X-Hub-Signature-256`,
HMAC-SHA256 of the raw body), which is checked before anything is read. An `issues` delivery
(opened, labeled, reopened) for a configured repository whose issue carries the label queues it
in the state DB, as polling would; `autovibe intake github` starts it on its next round.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import ValidationError

from contracts.intake import IntakeConfig
from contracts.secrets import SecretStoreError
from orchestrator.access import AuditLog
from orchestrator.intake.github import WHO, IssuesEvent, offer, verify_signature
from orchestrator.platform import Platform
from secretstore import store_from_env

PATH = "/v1/intake/github"
TAKEN_ACTIONS = ("opened", "labeled", "reopened")


def router(platform: Platform, intake: IntakeConfig | None) -> APIRouter:
    api = APIRouter()
    audit = AuditLog(platform.root, "intake")

    @api.post(PATH)
    async def github_webhook(request: Request) -> dict[str, Any]:
        github = intake.github if intake is not None else None
        if github is None:
            raise HTTPException(404, "the GitHub intake is not configured (AUTOVIBE_INTAKE_CONFIG)")
        body = await request.body()
        try:
            secret = store_from_env(settings=platform.settings).get(github.webhook_secret)
        except SecretStoreError as exc:
            raise HTTPException(503, f"webhook secret unavailable: {exc}") from exc
        if not verify_signature(secret, body, request.headers.get("x-hub-signature-256")):
            audit.record(who=WHO, action="webhook_refused", why="bad signature")
            raise HTTPException(401, "X-Hub-Signature-256 missing or wrong")
        event = request.headers.get("x-github-event", "")
        if event != "issues":
            return {"accepted": False, "why": f"event {event!r} is not used"}
        try:
            delivery = IssuesEvent.model_validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, f"not an issues delivery: {exc.errors()[:3]}") from exc
        repo = delivery.repository.full_name
        if repo not in {r.name for r in github.repos}:
            return {"accepted": False, "why": f"repository {repo} is not configured"}
        if delivery.action not in TAKEN_ACTIONS or not delivery.issue.labelled(github.label):
            return {"accepted": False, "why": f"{delivery.action}, label {github.label} absent"}
        queued = offer(platform.store, audit, repo, delivery.issue, via="webhook")
        return {"accepted": queued, "why": "queued" if queued else "taken before"}

    return api

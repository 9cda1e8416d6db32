"""Every flow becomes one FlowRecord in the spool: answered, refused by us, or failed.

Runs after identity and metering in the addon list, so it reads what they left in
`flow.metadata`. Each flow is written once, by whichever of its final hooks comes first.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal

from mitmproxy import http
from mitmproxy.addonmanager import Loader

from contracts.records import FlowRecord
from proxy.addons import dataroot
from proxy.addons.budget import METADATA_KEY as BUDGET_KEY
from proxy.addons.identity import identity_of
from proxy.addons.metering import metered
from proxy.addons.redaction import Redactor, redactor_for
from proxy.addons.refusal import refused
from proxy.spool import Spool

log = logging.getLogger(__name__)

CAPTURED_KEY = "autovibe.captured"


def record_of(flow: http.HTTPFlow) -> FlowRecord:
    """The capture record of a flow as it stands now."""
    request, response = flow.request, flow.response
    ts_start = request.timestamp_start
    if response is not None and response.timestamp_end is not None:
        ts_end = response.timestamp_end
    elif flow.error is not None:
        ts_end = flow.error.timestamp
    else:
        ts_end = time.time()
    ttfb_ms = None
    if response is not None and response.timestamp_start is not None:
        ttfb_ms = (response.timestamp_start - ts_start) * 1000
    identity = identity_of(flow)
    facts = metered(flow)
    first_chunk_ms = None
    if facts is not None and facts.first_chunk_at is not None:
        first_chunk_ms = (facts.first_chunk_at - ts_start) * 1000
    response_bytes = 0
    if response is not None and response.raw_content is not None:
        response_bytes = len(response.raw_content)
    elif facts is not None:
        # Streamed through: mitmproxy kept no body, the meter counted what passed.
        response_bytes = facts.response_bytes
    return FlowRecord(
        id=flow.id,
        ts_start=ts_start,
        ts_end=ts_end,
        duration_ms=(ts_end - ts_start) * 1000,
        ttfb_ms=ttfb_ms,
        first_chunk_ms=first_chunk_ms,
        method=request.method,
        # Where the flow really went, not what its Host header claims.
        url=request.url,
        host=request.host,
        path=request.path,
        status=response.status_code if response is not None else None,
        request_bytes=len(request.raw_content or b""),
        response_bytes=response_bytes,
        project=identity.project if identity else None,
        trial=identity.trial if identity else None,
        assignment=identity.assignment if identity else None,
        machine=identity.machine if identity else None,
        provider=facts.provider if facts else None,
        model=facts.model if facts else None,
        response_id=facts.response_id if facts else None,
        streamed=facts.streamed if facts else False,
        usage=facts.usage if facts else None,
        cost_usd=facts.cost_usd if facts else Decimal(0),
        budget=_budget_of(flow),
        error=_error_of(flow, facts.problem if facts else None),
    )


def _budget_of(flow: http.HTTPFlow) -> str | None:
    decision = flow.metadata.get(BUDGET_KEY)
    return None if decision is None else str(decision)


def _error_of(flow: http.HTTPFlow, metering_problem: str | None) -> str | None:
    if flow.error is not None:
        return flow.error.msg
    reason = refused(flow)
    if reason is not None:
        return reason
    return f"metering: {metering_problem}" if metering_problem else None


class Capture:
    def __init__(self) -> None:
        self.spool: Spool | None = None
        self.redactor = Redactor(None)

    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)

    def configure(self, updated: set[str]) -> None:
        if dataroot.OPTION in updated:
            if self.spool is not None:
                self.spool.close()
            self.spool = Spool(dataroot.current())
            self.redactor = redactor_for(dataroot.current())

    def response(self, flow: http.HTTPFlow) -> None:
        self._capture(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._capture(flow)

    def http_connect_error(self, flow: http.HTTPFlow) -> None:
        # A refused or unreachable CONNECT; a successful one is not a flow of its own,
        # the requests tunnelled through it are.
        self._capture(flow)

    def done(self) -> None:
        if self.spool is not None:
            self.spool.close()

    def _capture(self, flow: http.HTTPFlow) -> None:
        if flow.metadata.get(CAPTURED_KEY):
            return
        flow.metadata[CAPTURED_KEY] = True
        assert self.spool is not None
        try:
            self.spool.append(self.redactor.record(record_of(flow)))
        except (OSError, ValueError):
            # The spool is the source of truth; losing a line is an incident, not a warning.
            log.exception("could not spool flow %s %s", flow.id, flow.request.url)

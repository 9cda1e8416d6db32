"""Prometheus metrics of the proxy process, served by prometheus_client on their own port.

Off unless `autovibe_metrics_port` is set. Counted as flows end (response or error hook, after
every other addon has decided): flows by status class, upstream latency of forwarded calls,
budget refusals by reason, bytes each way, and spool write errors; the open reservations are
read from the budget addon when scraped. List it last in the addon script.
"""

from __future__ import annotations

import logging
from http.server import HTTPServer
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from contracts.records import BudgetDecision
from proxy.addons import capture
from proxy.addons.budget import METADATA_KEY as BUDGET_KEY
from proxy.addons.refusal import refused

OPTION = "autovibe_metrics_port"
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
"""Seconds; LLM calls run from tens of milliseconds (refusals upstream) to minutes (long
generations)."""
EXPORTED = (
    "autovibe_proxy_flows_total",
    "autovibe_proxy_upstream_seconds_bucket",
    "autovibe_proxy_upstream_seconds_sum",
    "autovibe_proxy_upstream_seconds_count",
    "autovibe_proxy_budget_refusals_total",
    "autovibe_proxy_bytes_total",
    "autovibe_proxy_reservations_open",
    "autovibe_proxy_spool_errors_total",
)
"""Every series name this addon exports, as scraped; the Grafana dashboard may query these."""


class _SpoolErrors(logging.Handler):
    """Counts the capture addon's errors: it logs one, with the exception, per lost line."""

    def __init__(self, counter: Counter) -> None:
        super().__init__(logging.ERROR)
        self.counter = counter

    def emit(self, record: logging.LogRecord) -> None:
        self.counter.inc()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.flows = Counter(
            "autovibe_proxy_flows", "Flows ended, by status class", ["status"], registry=r
        )
        self.latency = Histogram(
            "autovibe_proxy_upstream_seconds",
            "Forwarded calls: request received to last response byte from upstream",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.refusals = Counter(
            "autovibe_proxy_budget_refusals",
            "Calls the budget addon refused, by reason",
            ["reason"],
            registry=r,
        )
        self.bytes = Counter(
            "autovibe_proxy_bytes", "Body bytes through the proxy", ["direction"], registry=r
        )
        self.reservations = Gauge(
            "autovibe_proxy_reservations_open",
            "Budget reservations of flows in flight, not yet settled",
            registry=r,
        )
        self.reservations.set_function(self._open_reservations)
        self.spool_errors = Counter(
            "autovibe_proxy_spool_errors",
            "Flows that could not be written to the spool",
            registry=r,
        )
        self._spool_log = _SpoolErrors(self.spool_errors)
        self.server: HTTPServer | None = None
        self.port = 0

    # -- options -----------------------------------------------------------------------------
    def load(self, loader: Loader) -> None:
        loader.add_option(
            name=OPTION,
            typespec=int,
            default=0,
            help="Port of the proxy's Prometheus endpoint (/metrics), on listen_host; 0: none.",
        )
        logging.getLogger(capture.__name__).addHandler(self._spool_log)

    def configure(self, updated: set[str]) -> None:
        if OPTION not in updated:
            return
        port: int = getattr(ctx.options, OPTION)
        if not 0 <= port <= 65535:
            raise exceptions.OptionsError(f"{OPTION} must be a port (0 for none), got {port}")
        if port == self.port:
            return
        self._stop()
        if port:
            host = ctx.options.listen_host or "0.0.0.0"
            try:
                self.server, _ = start_http_server(port, addr=host, registry=self.registry)
            except OSError as exc:
                raise exceptions.OptionsError(
                    f"{OPTION}: cannot serve metrics on {host}:{port}: {exc}"
                ) from exc
            self.port = port

    def done(self) -> None:
        self._stop()
        logging.getLogger(capture.__name__).removeHandler(self._spool_log)

    # -- hooks -------------------------------------------------------------------------------
    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def _count(self, flow: http.HTTPFlow) -> None:
        if not self.port:
            return  # nobody scrapes: no work on the request path
        if flow.metadata.get("autovibe.metrics.counted"):
            return  # a flow can end with a response and then an error (client gone)
        flow.metadata["autovibe.metrics.counted"] = True
        # The capture addon (earlier in the list) leaves what it spooled on the flow.
        record = capture.Captured.of(flow)
        status = f"{record.status // 100}xx" if record.status is not None else "error"
        self.flows.labels(status).inc()
        self.bytes.labels("request").inc(record.request_bytes)
        self.bytes.labels("response").inc(record.response_bytes)
        decision = flow.metadata.get(BUDGET_KEY)
        if isinstance(decision, BudgetDecision) and decision.action == "refused":
            self.refusals.labels(decision.error or "refused").inc()
        response = flow.response
        if (
            response is not None
            and response.timestamp_end is not None
            and flow.request.timestamp_end is not None
            and refused(flow) is None
        ):
            self.latency.observe(max(response.timestamp_end - flow.request.timestamp_end, 0.0))

    # -- helpers -----------------------------------------------------------------------------
    def _open_reservations(self) -> float:
        budget: Any = ctx.master.addons.get("budget") if ctx.master else None
        return float(len(budget.live)) if budget is not None else 0.0

    def _stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        self.port = 0

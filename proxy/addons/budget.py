"""Reserve, then settle: no metered call is forwarded unless every budget it is charged to can
pay for the most it could cost, and every call that was let through is settled exactly once.

Runs after metering in the addon list (metering named the provider, the model and the price
catalogue). The scopes of a call: the project budget, the machine's daily allowance and,
when the task has one, the task's cap. Its input is reserved at the most it may be billed for
(`proxy.input_estimate`: the body, images at their ceiling, files and unseen earlier Responses
at the context window, earlier ones seen here at their metered tokens). A call without
`max_tokens` has it written in, capped at what the tightest scope can still pay and at
`autovibe_budget_max_tokens`; a call priced per unit (images, characters, seconds:
`proxy.endpoints`) reserves its quote's most. Refusals are
402 with the scope, what is left and when it resets; an unreachable counter store refuses
everything (503). Ends: `response` and `error` settle with metering's actual cost, written
with the next reservation (one transaction for both) or just after the hook, so the answer
never waits for it; what a killed proxy left open is settled by the orphan sweeper, at start
and every minute.

The spool decides what an orphan costs, so that the counters' spend and the ledger (posted
from the spool) stay equal to the cent. Each reservation notes its flow (who, where, the token
estimate, the rate). An orphan whose flow is in the spool (its settle failed: the store was
unreachable) is settled at the spooled cost. One that never reached the spool
(the proxy died mid-flow) gets a record first — its own flow id, usage estimated at what was
reserved, error ORPHAN_ERROR, cost = the reservation — and is then settled at that amount, the
most the call could have cost: the provider may have served it, so spend is never understated,
and a crash between the two steps leaves a spooled record that the next sweep settles at.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from mitmproxy import ctx, exceptions, http
from mitmproxy.addonmanager import Loader

from budget import (
    ADAPTERS,
    CounterError,
    CounterStore,
    CounterStoreUnavailable,
    Maintained,
    Refused,
    Reservation,
    ScopeState,
    Settlement,
    UnknownScope,
    iso,
    machine_scope,
    open_counters,
    project_scope,
    task_scope,
)
from budget.sweeper import sweep_orphans
from contracts.adapters import UnknownAdapter
from contracts.config import ConfigError, TokenPrice, load_models
from contracts.credentials import MachineIdentity
from contracts.records import ORPHAN_ENDING, BudgetDecision, FlowRecord, Usage
from proxy import reservation
from proxy.addons import dataroot
from proxy.addons.identity import identity_of
from proxy.addons.metering import Metered, metered
from proxy.addons.redaction import Redactor, redactor_for
from proxy.addons.refusal import fail_closed, refuse
from proxy.input_estimate import PROMPT_MARGIN_TOKENS as PROMPT_MARGIN_TOKENS  # re-exported
from proxy.input_estimate import (
    History,
    InputEstimate,
    context_window,
    conversation_key,
    estimate_input,
)
from proxy.output_cap import output_cap
from traffic.spool import Spool

log = logging.getLogger(__name__)

REDIS_URL_ENV = "AUTOVIBE_BUDGET_REDIS_URL"
"""Where the proxy finds the Redis URL (the setting `budget_redis_url`), never on its argv."""
METADATA_KEY = "autovibe.budget"
"""The decision (`contracts.records.BudgetDecision`), for the capture record."""
HOLD_KEY = "autovibe.budget.hold"
SCOPE_CACHE_S = 1.0
"""How long which scopes exist, and their currency, is remembered between calls. A scope's
currency never changes (`ensure_scope` refuses it); a scope opened or removed is seen within
this time. What is left in a scope is always read fresh: by `reserve`, and by `describe`
when a call has no `max_tokens` to cap."""
ORPHAN_ERROR = "proxy died mid-flow; settled at the reservation"
"""The `error` of the spool record the sweeper writes for an orphan that never reached it."""
FLOW_NOTE = "flow"
"""Key of the flow's facts in a reservation's metadata (what an orphan record is made of)."""


@dataclass
class Hold:
    """A reservation this proxy made for a flow and has yet to settle."""

    reservation_id: str
    amount: Decimal
    currency: str
    fx: Decimal
    scopes: tuple[str, ...]
    input_estimate: str | None = None
    """What the input reservation counted beyond the body (`InputEstimate.note`)."""
    settled: bool = False


MAINTAIN_INTERVAL_S = 1.0
"""Seconds between the counter store's housekeeping runs (`budget.Maintained`: SQLite's
WAL checkpoint), done on the budget thread so that no call waits for it."""


class Budget:
    sweep_interval_s = 60.0
    """Seconds between orphan sweeps while the proxy runs."""

    def __init__(self) -> None:
        self.store: CounterStore | None = None
        self.ceiling = 4096
        self.orphan_s = 900.0
        self.live: set[str] = set()
        """Reservations of flows in flight here, or settled and not yet written: never orphans,
        whatever their age."""
        self._pending: list[Settlement] = []
        """Settlements of ended flows, to be written with the next reservation or just after
        the hook that made them (`_flush`), whichever comes first."""
        self._flush_scheduled = False
        self._scopes: dict[str, tuple[float, ScopeState | None]] = {}
        """Scope -> (when described, state or None): see SCOPE_CACHE_S."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.spool: Spool | None = None
        """Where the sweeper writes orphans' records; capture writes every other flow's."""
        self._redactor: Redactor | None = None
        self.history = History()
        """Tokens of the Responses calls metered here, for a later call that names them."""
        self.local_contexts: dict[str, int] = {}
        """Context length of each local model by served name (models.yaml)."""

    # -- options -----------------------------------------------------------------------------
    def load(self, loader: Loader) -> None:
        dataroot.add_option(loader)
        loader.add_option(
            name="autovibe_budget_store",
            typespec=str,
            default="sqlite",
            help=f"Budget counter store: {' or '.join(ADAPTERS)} (sqlite lives in the data root).",
        )
        loader.add_option(
            name="autovibe_budget_redis_url",
            typespec=str,
            # From the environment by default: a URL with a password on mitmdump's command
            # line is readable by any local user in /proc/<pid>/cmdline.
            default=os.environ.get(REDIS_URL_ENV) or "redis://127.0.0.1:6379/0",
            help="Redis URL of the budget counters when autovibe_budget_store is redis; "
            f"default: ${REDIS_URL_ENV}, the way to pass one with a password.",
        )
        loader.add_option(
            name="autovibe_budget_max_tokens",
            typespec=int,
            default=4096,
            help="Most completion tokens written into a request that sets no max_tokens.",
        )
        loader.add_option(
            name="autovibe_budget_orphan_s",
            typespec=int,
            default=900,
            help="Seconds after which an unsettled reservation no flow here holds is an orphan "
            "(a killed proxy's) and is settled at its reserved amount.",
        )

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if "autovibe_budget_max_tokens" in updated:
            if opts.autovibe_budget_max_tokens < 1:
                raise exceptions.OptionsError(
                    "autovibe_budget_max_tokens must be at least 1, got "
                    f"{opts.autovibe_budget_max_tokens}"
                )
            self.ceiling = opts.autovibe_budget_max_tokens
        if "autovibe_budget_orphan_s" in updated:
            if opts.autovibe_budget_orphan_s < 0:
                raise exceptions.OptionsError(
                    "autovibe_budget_orphan_s cannot be negative, got "
                    f"{opts.autovibe_budget_orphan_s}"
                )
            self.orphan_s = float(opts.autovibe_budget_orphan_s)
        name, url = opts.autovibe_budget_store, opts.autovibe_budget_redis_url
        if "autovibe_budget_store" in updated and name not in ADAPTERS:
            raise exceptions.OptionsError(
                f"autovibe_budget_store: unknown store {name!r}; allowed: {', '.join(ADAPTERS)}"
            )
        if "autovibe_budget_redis_url" in updated and not url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise exceptions.OptionsError(
                f"autovibe_budget_redis_url: {url!r} is not a redis://, rediss:// or unix:// URL"
            )
        if "autovibe_configs" in updated:  # declared by metering
            self.local_contexts = local_contexts(Path(opts.autovibe_configs))
        if dataroot.OPTION in updated:
            if self.spool is not None:
                self.spool.close()
            self.spool, self._redactor = Spool(dataroot.current()), None
        if updated & {dataroot.OPTION, "autovibe_budget_store", "autovibe_budget_redis_url"}:
            if self.store is not None:
                self._flush()  # into the store they were reserved in
                self.store.close()
            self._scopes.clear()
            try:
                self.store = open_counters(
                    name, path=dataroot.current().budget_counters, url=url, maintained=True
                )
            except (CounterError, UnknownAdapter) as exc:
                raise exceptions.OptionsError(f"autovibe_budget_store {name}: {exc}") from exc

    # -- lifecycle ---------------------------------------------------------------------------
    def running(self) -> None:
        # The first sweep runs in the thread: an error logged during startup stops mitmdump.
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="autovibe-budget", daemon=True)
            self._thread.start()

    def done(self) -> None:
        self._flush()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.store is not None:
            self.store.close()
        if self.spool is not None:
            self.spool.close()

    def sweep(self) -> int:
        """Settle orphans now; returns how many."""
        if self.store is None:
            return 0
        try:
            older_than = time.time() - self.orphan_s
            swept = sweep_orphans(
                self.store, older_than, keep=set(self.live), settle_at=self._as_spooled
            )
            return len(swept)
        except CounterError as exc:
            log.warning("budget orphan sweep failed; the next one tries again: %s", exc)
            return 0

    def _as_spooled(self, orphan: Reservation, reserved: Decimal) -> tuple[Decimal, str] | None:
        """The spool's word on an orphan of ours: its spooled cost, or a record written now."""
        note = orphan.meta.get(FLOW_NOTE)
        if not isinstance(note, dict) or self.spool is None:
            return reserved, "charged reserved"  # not a proxied flow (a payment): no record
        fx = Decimal(note["fx"])
        record = orphan_record(orphan, note, reserved)
        try:
            found = self.spool.find(record)
            if found is not None:
                return found.cost_usd * fx, f"charged {found.cost_usd} USD as spooled"
            if self._redactor is None:  # made on the first orphan: most proxies never meet one
                self._redactor = redactor_for(dataroot.current())
            self.spool.append(self._redactor.record(record))
        except (OSError, ValueError):
            log.exception(
                "could not spool orphan %s; the next sweep tries again", orphan.reservation_id
            )
            return None
        return reserved, "charged reserved, spooled as an orphan record"

    def _run(self) -> None:
        self.sweep()
        swept = time.monotonic()
        while not self._stop.wait(min(MAINTAIN_INTERVAL_S, self.sweep_interval_s)):
            store = self.store
            if isinstance(store, Maintained):  # only stores with housekeeping have it
                try:
                    store.maintain()
                except CounterError as exc:
                    log.warning("budget counter store housekeeping failed: %s", exc)
            if time.monotonic() - swept >= self.sweep_interval_s:
                self.sweep()
                swept = time.monotonic()

    # -- reserve -----------------------------------------------------------------------------
    @fail_closed
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response is not None:
            return
        facts, identity = metered(flow), identity_of(flow)
        if facts is None or facts.model is None or identity is None:
            return  # metering names the model of every call it prices, and only of those
        assert self.store is not None and facts.prices is not None
        price = None if facts.quote else facts.prices.price(facts.provider, facts.model)
        assert price is not None or facts.quote, "metering refuses calls it cannot price"
        try:
            self._reserve(flow, identity, facts, price)
        except CounterStoreUnavailable as exc:
            log.error("budget counter store unavailable, refusing %s: %s", flow.id, exc)
            self._refuse(flow, 503, {"error": "counter_store_unavailable", "detail": str(exc)})
        except UnknownScope as exc:
            self._refuse(
                flow,
                402,
                {"error": "no_budget", "scope": exc.scope, "left": "0", "currency": None,
                 "resets_at": None, "detail": str(exc)},
            )  # fmt: skip

    def _reserve(
        self,
        flow: http.HTTPFlow,
        identity: MachineIdentity,
        facts: Metered,
        price: TokenPrice | None,
    ) -> None:
        assert self.store is not None and facts.prices is not None
        project = identity.project
        now = time.time()
        names = [project_scope(project), machine_scope(project, identity.machine)]
        if identity.task:
            names.append(task_scope(identity.trial, identity.task))
        body = flow.request.get_content(strict=False) or b""
        doc = facts.request_doc if facts.request_doc is not None else _json_object(body)
        wanted = None if facts.api is None else output_cap(facts.api, doc, facts.provider)
        asked = wanted.asked if wanted is not None else None
        capped = wanted is None or asked is not None
        states: list[ScopeState] = []
        for name in names:
            # Without max_tokens the cap needs what is left now: described fresh.
            state = self._describe(name, now, fresh=not capped)
            if state is None and not name.startswith("task:"):
                raise UnknownScope(name)
            if state is not None:  # a task without a budget has no scope of its own
                states.append(state)
        currencies = {s.currency for s in states}
        if len(currencies) != 1 or (currency := currencies.pop()) not in facts.prices.fx:
            self._refuse(flow, 500, {
                "error": "budget_currency",
                "detail": f"scopes {names} count {sorted(s.currency for s in states)}; one "
                "currency with a rate in prices.yaml is needed",
            })  # fmt: skip
            return
        fx = facts.prices.fx[currency]
        input_note = None
        if facts.quote is not None:
            # Priced per unit (proxy.endpoints): the most it may cost is known from the
            # request, which goes on unchanged.
            q = facts.quote
            held = reservation.per_unit(q.most_usd, fx, q.most, q.unit)
        else:
            assert price is not None and wanted is not None
            estimate = self._estimate_input(flow, facts, doc, len(body))
            input_note = estimate.note
            tightest = min(states, key=lambda s: s.left)
            found = reservation.for_tokens(
                input_per_mtok=price.input_per_mtok * fx,
                output_per_mtok=price.output_per_mtok * fx,
                prompt_tokens=estimate.tokens,
                asked=asked,
                choices=max(_int(doc.get("n")), _int(doc.get("best_of")), 1),
                left=tightest.left,
                ceiling=self.ceiling,
            )
            if found is None:
                self._exhausted(flow, Refused(tightest.scope, tightest.left, currency,
                                              tightest.resets_at))  # fmt: skip
                return
            held = found
            if held.cap is not None:
                doc[wanted.field] = held.cap
                flow.request.set_content(json.dumps(doc).encode())
        amount, prompt_tokens, completion_tokens = (
            held.amount,
            held.prompt_tokens,
            held.completion_tokens,
        )
        scopes = tuple(s.scope for s in states)
        # No query string in the note: it may carry a key, and the counter store is not redacted.
        note = {
            "ts_start": flow.request.timestamp_start, "method": flow.request.method,
            "url": flow.request.url.partition("?")[0], "host": flow.request.host,
            "path": flow.request.path.partition("?")[0],
            "request_bytes": len(body), "project": project, "trial": identity.trial,
            "assignment": identity.assignment, "machine": identity.machine,
            "provider": facts.provider, "model": facts.model, "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "currency": currency, "fx": str(fx),
        }  # fmt: skip
        if input_note is not None:
            note["input_estimate"] = input_note
        # Settlements waiting to be written go in this reservation's transaction (one commit).
        pending, self._pending = self._pending, []
        try:
            outcome = self.store.reserve(
                flow.id, scopes, amount, now, {FLOW_NOTE: note}, settle=pending
            )
        except CounterError as exc:
            self._pending[:0] = pending  # none was made: they wait for the next write
            if pending:
                self._schedule_flush()
            if isinstance(exc, UnknownScope):
                self._scopes.clear()  # removed since it was described: the next call looks
            raise
        self.live.difference_update(s.reservation_id for s in pending)
        if isinstance(outcome, Refused):
            self._exhausted(flow, outcome)
            return
        flow.metadata[HOLD_KEY] = Hold(flow.id, outcome.amount, currency, fx, scopes, input_note)
        # Validated, not `model_construct`: pydantic's validation in Rust is the faster of the
        # two (about 6 against 13 us a call here), and it checks our own values on the way.
        flow.metadata[METADATA_KEY] = BudgetDecision(
            action="reserved",
            scopes=list(scopes),
            reserved=outcome.amount,
            currency=currency,
            input_estimate=input_note,
        )
        self.live.add(flow.id)

    def _estimate_input(
        self, flow: http.HTTPFlow, facts: Metered, doc: dict[str, Any], body_bytes: int
    ) -> InputEstimate:
        assert facts.api is not None and facts.model is not None
        window = context_window(
            facts.provider,
            facts.model,
            self.local_contexts,
            anthropic_beta=flow.request.headers.get("anthropic-beta", ""),
        )
        return estimate_input(facts.api, facts.model, doc, body_bytes, window, self.history)

    def _describe(self, name: str, now: float, *, fresh: bool) -> ScopeState | None:
        """The scope as the store describes it, or as it did less than SCOPE_CACHE_S ago."""
        assert self.store is not None
        hit = self._scopes.get(name)
        if fresh or hit is None or not 0 <= now - hit[0] < SCOPE_CACHE_S:
            hit = (now, self.store.describe(name, now))
            self._scopes[name] = hit
        return hit[1]

    def _exhausted(self, flow: http.HTTPFlow, refused: Refused) -> None:
        self._refuse(
            flow,
            402,
            {
                "error": "budget_exhausted",
                "scope": refused.scope,
                "left": str(refused.left),
                "currency": refused.currency,
                "resets_at": iso(refused.resets_at),
                "detail": f"{refused.scope} has {refused.left} {refused.currency} left, less "
                "than this call may cost; "
                + (
                    f"it resets at {iso(refused.resets_at)}"
                    if refused.resets_at
                    else "it never resets"
                ),
            },
        )

    def _refuse(self, flow: http.HTTPFlow, status: int, body: dict[str, Any]) -> None:
        refuse(flow, status, body)
        flow.metadata[METADATA_KEY] = BudgetDecision(
            action="refused",
            error=body["error"],
            scopes=[body["scope"]] if body.get("scope") else [],
        )

    # -- settle ------------------------------------------------------------------------------
    def response(self, flow: http.HTTPFlow) -> None:
        self._settle(flow, "response")
        self._remember(flow)

    def _remember(self, flow: http.HTTPFlow) -> None:
        """Keep a Responses call's input + output tokens under its id and its conversation:
        the earlier conversation a later call names, and the provider bills again."""
        facts = metered(flow)
        if facts is None or facts.api != "openai_responses" or facts.response_id is None:
            return
        usage, response = facts.usage, flow.response
        if usage is None or usage.estimated or response is None or response.status_code >= 300:
            return  # an estimate may be short: a later call reserves the context window
        tokens = usage.prompt_tokens + usage.completion_tokens
        self.history.remember(facts.response_id, tokens)
        conversation = conversation_key(facts.request_doc)
        if conversation is not None:
            self.history.remember(conversation, tokens)

    def error(self, flow: http.HTTPFlow) -> None:
        self._settle(flow, f"error: {flow.error.msg if flow.error else 'unknown'}")

    def _settle(self, flow: http.HTTPFlow, ending: str) -> None:
        """Queue the flow's settlement: it is written with the next reservation, or by
        `_flush` once this hook is done, so that under load one commit serves both, and the
        answer goes out before an idle proxy writes. Capture spooled the flow before this
        hook: a proxy killed before the write leaves an open reservation whose flow is in the
        spool, which the orphan sweeper settles at the spooled cost, the same amount."""
        hold = flow.metadata.get(HOLD_KEY)
        if not isinstance(hold, Hold) or hold.settled or self.store is None:
            return
        actual = _actual(flow, hold)
        hold.settled = True
        flow.metadata[METADATA_KEY] = _settled(hold, actual, ending)
        self._pending.append(Settlement(hold.reservation_id, actual, ending))
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # hooks called outside mitmproxy's event loop: write now
            self._flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write the queued settlements (one transaction); what fails is left to the sweeper."""
        self._flush_scheduled = False
        pending, self._pending = self._pending, []
        if not pending or self.store is None:
            return
        try:
            self.store.settle_many(pending)
        except CounterError:
            # Still open in the store: the sweeper settles them at the spooled cost.
            log.exception(
                "could not settle reservations %s; left to the sweeper",
                ", ".join(s.reservation_id for s in pending),
            )
        finally:
            self.live.difference_update(s.reservation_id for s in pending)


def decision_of(flow: http.HTTPFlow) -> BudgetDecision | None:
    """The budget decision as the capture record states it, once the flow is over.

    Capture spools a flow before this addon settles it (the addon order): the record states
    the settlement about to be made — the flow's metered cost, which is also what the orphan
    sweeper settles at, from the spool, if the proxy dies in between.
    """
    decision = flow.metadata.get(METADATA_KEY)
    hold = flow.metadata.get(HOLD_KEY)
    if isinstance(hold, Hold) and not hold.settled:
        ending = "response"
        if flow.error is not None:
            ending = f"error: {flow.error.msg}"
        elif flow.response is None:
            ending = "error: unknown"
        return _settled(hold, _actual(flow, hold), ending)
    return decision if isinstance(decision, BudgetDecision) else None


def _actual(flow: http.HTTPFlow, hold: Hold) -> Decimal:
    """What the flow costs in the hold's currency: its metered cost (0 when unmetered)."""
    facts = metered(flow)
    return (facts.cost_usd if facts else Decimal(0)) * hold.fx


def _settled(hold: Hold, actual: Decimal, ending: str) -> BudgetDecision:
    return BudgetDecision(  # validated: faster than model_construct (see `_reserve`)
        action="settled",
        scopes=list(hold.scopes),
        reserved=hold.amount,
        settled=actual.quantize(Decimal("0.000001")),
        currency=hold.currency,
        ending=ending,
        input_estimate=hold.input_estimate,
    )


def orphan_record(orphan: Reservation, note: dict[str, Any], settled: Decimal) -> FlowRecord:
    """The spool record of a flow whose proxy died before capturing it, from its reservation."""
    fx, now = Decimal(note["fx"]), time.time()
    prompt, completion = int(note["prompt_tokens"]), int(note["completion_tokens"])
    decision = BudgetDecision(
        action="settled",
        scopes=list(orphan.scopes),
        reserved=orphan.amount,
        settled=settled,
        currency=note["currency"],
        ending=ORPHAN_ENDING,
        input_estimate=note.get("input_estimate"),
    )
    return FlowRecord(
        id=orphan.reservation_id,
        ts_start=note["ts_start"],
        ts_end=now,
        duration_ms=(now - note["ts_start"]) * 1000,
        method=note["method"],
        url=note["url"],
        host=note["host"],
        path=note["path"],
        request_bytes=note["request_bytes"],
        project=note["project"],
        trial=note["trial"],
        assignment=note["assignment"],
        machine=note["machine"],
        provider=note["provider"],
        model=note["model"],
        usage=Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            estimated=True,
        ),
        cost_usd=_usd(settled, fx),
        error=ORPHAN_ERROR,
        budget=decision.text(),
        budget_decision=decision,
    )


def _usd(amount: Decimal, fx: Decimal) -> Decimal:
    """`amount` in USD: exact when the rate divides it, else to 1e-12 USD (the same micro-unit
    once multiplied back, which is how the counters and the ledger read it)."""
    usd = amount / fx
    return usd if usd * fx == amount else usd.quantize(Decimal("1e-12"))


def local_contexts(configs: Path) -> dict[str, int]:
    """Context length of each local model by served name, from models.yaml; {} without one
    (a local model's window is then unknown, and no estimate is capped at it)."""
    if not (configs / "models.yaml").is_file():
        return {}
    try:
        catalog = load_models(configs)
    except ConfigError as exc:
        raise exceptions.OptionsError(f"autovibe_configs: {exc}") from exc
    return {
        spec.served_name: spec.context
        for pair in catalog.pairs.values()
        for spec in (pair.normal, pair.thinking)
    }


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0

"""`autovibe top`: a live terminal dashboard of workers, spend, budget burn and events.

Everything comes from the control API, so it works against a remote API with a token: the
trials and their assignments (`GET /v1/trials/{id}`), the events (the SSE stream, read until it
pauses, then resumed with `Last-Event-ID`), and the budget scopes (`GET /metrics`: limit,
spent, reserved and remaining per scope). `Top.frame()` gathers one `Frame`; `render` turns it
into Rich renderables, a pure function of the frame, so `--once` prints exactly what the live
view shows.

Burn rate per hour: measured between refreshes (the change of a scope's settled spend over the
last `BURN_WINDOW_S`); before there are two samples (the first frame, `--once`) a project's
rate is its shown trials' metered spend over the time they have been running. Time to
exhaustion is what a scope has left divided by that rate.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from contracts.settings import Settings
from orchestrator.client import ApiError, Client

BURN_WINDOW_S = 900.0
"""Spend samples older than this are forgotten when measuring a burn rate."""
EVENT_PAUSE_S = 1.0
"""An events stream silent this long has nothing more for now (it stays open while a trial
runs)."""
MIN_BURN_SPAN_S = 60.0
"""A burn rate is shown only once spend was observed over at least this long."""
BAR_WIDTH = 20
SCOPE_KINDS = ("project", "machine", "task")
ACTIVE = ("queued", "running")
DONE = ("finished", "failed", "cancelled")


@dataclass(frozen=True)
class Scope:
    """A budget scope as /metrics reports it, in its currency."""

    scope: str
    currency: str
    limit: float
    spent: float
    reserved: float
    remaining: float

    @property
    def project(self) -> str | None:
        kind, _, rest = self.scope.partition(":")
        return rest.split(":")[0] if kind in ("project", "machine") else None


@dataclass(frozen=True)
class Event:
    trial: str
    id: int
    kind: str
    data: dict[str, Any]

    @property
    def ts(self) -> float | None:
        return _epoch(self.data.get("ts"))


@dataclass
class Frame:
    """Everything one screen shows, fetched at `now`."""

    now: float
    trials: list[dict[str, Any]]
    scopes: list[Scope]
    events: list[Event]
    burn: dict[str, float | None] = field(default_factory=dict)
    """Settled spend per hour by scope; None when not measurable yet."""
    focus: str | None = None


class Top:
    """Fetches frames from the control API; keeps what the next frame builds on (event ids,
    spend samples)."""

    def __init__(self, client: Client, trial: str | None = None, events: int = 12) -> None:
        self.client = client
        self.focus = trial
        self.seen: dict[str, deque[Event]] = {}
        self.last_id: dict[str, int] = {}
        self.samples: dict[str, deque[tuple[float, float]]] = {}
        self.max_events = events

    def frame(self, now: float | None = None) -> Frame:
        now = time.time() if now is None else now
        trials = [self.client.trial(t) for t in self._trial_ids()]
        for t in trials:
            self._follow(t["id"])
        projects = {t["project"] for t in trials}
        focus_tasks = {f"task:{t['id']}:" for t in trials}
        scopes = [
            s
            for s in self._scopes()
            if s.project in projects or any(s.scope.startswith(p) for p in focus_tasks)
        ]
        events = sorted(
            (e for t in trials for e in self.seen.get(t["id"], ())), key=lambda e: e.ts or 0
        )[-self.max_events :]
        return Frame(now, trials, scopes, events, self._burn(now, scopes, trials), self.focus)

    # -- sources -----------------------------------------------------------------------------
    def _trial_ids(self) -> list[str]:
        if self.focus is not None:
            return [self.focus]
        listed = self.client.trials()  # newest first
        active = [t["id"] for t in listed if t["status"] in ACTIVE]
        return active or [t["id"] for t in listed[:1]]

    def _scopes(self) -> list[Scope]:
        from prometheus_client.parser import text_string_to_metric_families  # `top` only

        resp = self.client.http.get("/metrics")
        if resp.status_code >= 400:
            raise ApiError(resp.status_code, resp.text)
        values: dict[tuple[str, str], dict[str, float]] = {}
        for family in text_string_to_metric_families(resp.text):
            name = family.name.removeprefix("autovibe_budget_")
            if name not in ("limit", "spent", "reserved", "remaining"):
                continue
            for sample in family.samples:
                key = (sample.labels["scope"], sample.labels["currency"])
                values.setdefault(key, {})[name] = sample.value
        return [
            Scope(
                scope,
                currency,
                v.get("limit", 0),
                v.get("spent", 0),
                v.get("reserved", 0),
                v.get("remaining", 0),
            )
            for (scope, currency), v in sorted(values.items(), key=_scope_order)
        ]

    def _follow(self, trial_id: str) -> None:
        """Read the trial's new events until its stream ends or pauses."""
        seen = self.seen.setdefault(trial_id, deque(maxlen=200))
        for event in _sse(self.client.http, trial_id, self.last_id.get(trial_id, 0)):
            seen.append(event)
            self.last_id[trial_id] = event.id

    def _burn(
        self, now: float, scopes: list[Scope], trials: list[dict[str, Any]]
    ) -> dict[str, float | None]:
        burn: dict[str, float | None] = {}
        for s in scopes:
            history = self.samples.setdefault(s.scope, deque())
            history.append((now, s.spent))
            while history and history[0][0] < now - BURN_WINDOW_S and len(history) > 2:
                history.popleft()
            (t0, spent0), (t1, spent1) = history[0], history[-1]
            span = t1 - t0
            burn[s.scope] = (spent1 - spent0) * 3600 / span if span >= MIN_BURN_SPAN_S else None
            if burn[s.scope] is None and s.scope.startswith("project:"):
                burn[s.scope] = _trial_burn(now, [t for t in trials if t["project"] == s.project])
        return burn


def _sse(http: httpx.Client, trial_id: str, after: int) -> Iterator[Event]:
    headers = {"Last-Event-ID": str(after)} if after else {}
    timeout = httpx.Timeout(30, read=EVENT_PAUSE_S)
    try:
        with http.stream(
            "GET", f"/v1/trials/{trial_id}/events", headers=headers, timeout=timeout
        ) as resp:
            if resp.status_code >= 400:
                resp.read()
                raise ApiError(resp.status_code, resp.text)
            event_id, kind, data = 0, "message", ""
            for line in resp.iter_lines():
                if line.startswith("id:"):
                    event_id = int(line.removeprefix("id:").strip())
                elif line.startswith("event:"):
                    kind = line.removeprefix("event:").strip()
                elif line.startswith("data:"):
                    data += line.removeprefix("data:").strip()
                elif not line and data:
                    yield Event(trial_id, event_id, kind, json.loads(data))
                    event_id, kind, data = 0, "message", ""
    except httpx.ReadTimeout:
        return  # the trial is still running: nothing new for now


def _trial_burn(now: float, trials: list[dict[str, Any]]) -> float | None:
    """Metered spend per hour of these trials since each was created (until it finished)."""
    spent = hours = 0.0
    for t in trials:
        start = _epoch(t.get("created_at"))
        end = _epoch(t.get("finished_at")) or now
        if start is None or end <= start:
            continue
        spent += float(t["spend"]["amount"])
        hours += (end - start) / 3600
    return spent / hours if hours * 3600 >= MIN_BURN_SPAN_S else None


def _scope_order(item: tuple[tuple[str, str], Any]) -> tuple[int, str]:
    """Projects first, then machine days, then tasks."""
    scope = item[0][0]
    kind = scope.partition(":")[0]
    return (SCOPE_KINDS.index(kind) if kind in SCOPE_KINDS else len(SCOPE_KINDS), scope)


def _epoch(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# -- rendering -----------------------------------------------------------------------------------


def render(frame: Frame) -> RenderableType:
    """The whole screen for one frame."""
    return Group(_header(frame), _workers(frame), _budgets(frame), _events(frame))


def _header(frame: Frame) -> Text:
    at = dt.datetime.fromtimestamp(frame.now, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    parts = [f"autovibe top · {at}"]
    for t in frame.trials:
        states = [a["state"] for a in t["assignments"]]
        counts = ", ".join(
            f"{n} {s}" for s in (*ACTIVE, *DONE, "deferred") if (n := states.count(s))
        )
        spend = t["spend"]
        parts.append(
            f"trial {t['name']} ({t['id']}) {t['status']}: {counts or 'no assignments'} · "
            f"spent {Decimal(spend['amount']):.4f} of {Decimal(spend['budget']):.2f} "
            f"{spend['currency']}"
        )
    return Text("\n".join(parts), style="bold")


def _workers(frame: Frame) -> Table:
    table = Table(title="Workers", title_justify="left", expand=True)
    for col in ("assignment", "task", "agent", "pair", "machine", "state", "elapsed", "spend"):
        table.add_column(col, justify="right" if col in ("elapsed", "spend") else "left")
    started, ended = _times(frame.events)
    for t in frame.trials:
        currency = t["spend"]["currency"]
        for a in t["assignments"]:
            if frame.focus is None and a["state"] != "running":
                continue  # without a focus, the workers busy now
            table.add_row(
                a["id"],
                a["task"],
                a["agent"],
                a["model"],
                a.get("machine") or "—",
                a["state"],
                _elapsed(a, started, ended, frame.now),
                _spend(a, currency),
            )
    return table


def _times(events: list[Event]) -> tuple[dict[str, float], dict[str, float]]:
    started: dict[str, float] = {}
    ended: dict[str, float] = {}
    for e in events:
        who, ts = e.data.get("assignment"), e.ts
        if not isinstance(who, str) or ts is None:
            continue
        if e.kind == "assignment_started":
            started[who] = ts
            ended.pop(who, None)
        elif e.kind in {f"assignment_{s}" for s in DONE}:
            ended[who] = ts
    return started, ended


def _elapsed(
    a: dict[str, Any], started: dict[str, float], ended: dict[str, float], now: float
) -> str:
    if a.get("wall_s") is not None:
        return _duration(float(a["wall_s"]))
    if a["id"] in started and a["state"] in ("running", *DONE):
        return _duration(ended.get(a["id"], now) - started[a["id"]])
    return "—"


def _spend(a: dict[str, Any], currency: str) -> str:
    # `spend`: metered so far (running); `cost`: posted when the assignment ended.
    value = a.get("spend") if a.get("spend") is not None else a.get("cost")
    return "—" if value is None else f"{Decimal(value):.4f} {currency}"


def _budgets(frame: Frame) -> Table:
    table = Table(title="Spend and budget burn", title_justify="left", expand=True)
    for col in ("scope", "used / limit", "", "burn / h", "exhausted in"):
        table.add_column(col, justify="left" if col in ("scope", "") else "right")
    for s in frame.scopes:
        rate = frame.burn.get(s.scope)
        used = s.spent + s.reserved
        table.add_row(
            s.scope,
            f"{used:.4f} / {s.limit:.2f} {s.currency}",
            _bar(used / s.limit if s.limit > 0 else 1.0),
            "—" if rate is None else f"{rate:.4f} {s.currency}",
            _exhaustion(s.remaining, rate),
        )
    return table


def _bar(fraction: float) -> Text:
    fraction = min(max(fraction, 0.0), 1.0)
    full = round(fraction * BAR_WIDTH)
    style = "red" if fraction >= 0.8 else "yellow" if fraction >= 0.5 else "green"
    return Text("█" * full + "░" * (BAR_WIDTH - full) + f" {fraction:.0%}", style=style)


def _exhaustion(remaining: float, rate: float | None) -> str:
    if remaining <= 0:
        return "spent"
    if rate is None:
        return "—"
    if rate <= 0:
        return "never at this rate"
    return _duration(remaining / rate * 3600)


def _duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def _events(frame: Frame) -> Table:
    table = Table(title="Newest events", title_justify="left", expand=True)
    for col in ("time", "trial", "event", "detail"):
        table.add_column(col)
    for e in reversed(frame.events):
        ts = e.ts
        when = dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%H:%M:%S") if ts else "—"
        detail = " ".join(f"{k}={v}" for k, v in e.data.items() if k != "ts" and v is not None)
        table.add_row(when, e.trial, e.kind, detail)
    return table


# -- the command ---------------------------------------------------------------------------------


def top(
    trial: Annotated[
        str | None, typer.Option("--trial", help="Focus on one trial: all its assignments.")
    ] = None,
    interval: Annotated[
        float, typer.Option("--interval", min=0.5, help="Seconds between refreshes.")
    ] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    events: Annotated[int, typer.Option("--events", min=1, help="Events shown.")] = 12,
    api: Annotated[
        str | None,
        typer.Option("--api", help="Control API URL (default: AUTOVIBE_HOST/AUTOVIBE_API_PORT)."),
    ] = None,
) -> None:
    """Live dashboard of workers, spend, budget burn and events, from the control API (bearer
    token from $AUTOVIBE_TOKEN or the data root)."""
    console = Console()
    try:
        client = Client(Settings())
    except ApiError as exc:
        console.print(f"[red]{exc.detail}[/red]")
        raise typer.Exit(1) from exc
    if api is not None:
        client.http.base_url = httpx.URL(api)
    run(Top(client, trial, events), console, interval=interval, once=once)


def run(top_: Top, console: Console, *, interval: float = 2.0, once: bool = False) -> None:
    """Print one frame (`once`), or refresh the screen every `interval` seconds until ^C."""
    try:
        if once:
            console.print(render(top_.frame()))
            return
        with Live(render(top_.frame()), console=console, screen=False, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(top_.frame()), refresh=True)
    except ApiError as exc:
        console.print(f"[red]control API: {exc}[/red]")
        raise typer.Exit(1) from exc
    except KeyboardInterrupt:
        return

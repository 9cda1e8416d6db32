"""The state DB: trials, their assignments and events (SQLAlchemy 2; SQLite WAL or PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from contracts.config import TrialConfig
from contracts.dataroot import DataRoot
from contracts.results import AssignmentResult
from contracts.settings import Settings

TRIAL_ACTIVE = ("queued", "running")
ASSIGNMENT_DONE = ("finished", "failed", "cancelled")
ASSIGNMENT_WAITING = ("queued", "deferred")
"""Not started, or put back until its machine's daily allowance resets (`not_before`)."""


def stored_config(data: dict[str, Any]) -> TrialConfig:
    """A stored trial's config (`Trial.config`), read back. It was checked against the server's
    limits when submitted, so it is read without them; fields older trials carry are dropped."""
    return TrialConfig.model_validate(data)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Trial(Base):
    __tablename__ = "trials"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    config: Mapped[dict[str, Any]]
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[dt.datetime | None]
    assignments: Mapped[list[Assignment]] = relationship(
        back_populates="trial", order_by="Assignment.index"
    )


class Assignment(Base):
    """One task × agent × model pair run on one machine; `id` doubles as an idempotency key."""

    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("trial_id", "index"),)

    id: Mapped[str] = mapped_column(String(48), primary_key=True)
    trial_id: Mapped[str] = mapped_column(ForeignKey("trials.id"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[str] = mapped_column(String(64))
    agent: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    """queued → running → finished | failed | cancelled; running → deferred → running when
    only the machine's daily allowance refused it."""
    machine: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str | None] = mapped_column(String(16))
    """Grade: resolved | partial | unresolved (None until graded)."""
    exit_cause: Mapped[str | None] = mapped_column(String(32))
    result: Mapped[dict[str, Any] | None]
    """The ending as JSON (`contracts.results.AssignmentResult`); read and written only through
    `ending`, or `AssignmentResult.stored` where the column is selected alone."""
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    not_before: Mapped[dt.datetime | None]
    """A deferred assignment starts again from this moment (UTC): its allowance's reset."""
    trial: Mapped[Trial] = relationship(back_populates="assignments")

    @property
    def ending(self) -> AssignmentResult:
        """The runner's `result.json` plus what the orchestrator adds (spend, confidence, a
        deferral, a cancel); empty until the assignment ends. Older rows read the same."""
        return AssignmentResult.stored(self.result)

    @ending.setter
    def ending(self, value: AssignmentResult) -> None:
        self.result = value.to_json()


class Event(Base):
    """What happened to a trial, in order; the SSE stream replays these."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_id: Mapped[str] = mapped_column(ForeignKey("trials.id"), index=True)
    ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    text: Mapped[str] = mapped_column(Text, default="")


class BudgetAlert(Base):
    """A budget threshold a trial's scope crossed; one per trial, scope, period and threshold,
    so a restarted orchestrator never raises it twice."""

    __tablename__ = "budget_alerts"
    __table_args__ = (UniqueConstraint("trial_id", "scope", "period", "threshold"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_id: Mapped[str] = mapped_column(ForeignKey("trials.id"), index=True)
    project: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(200))
    period: Mapped[str] = mapped_column(String(32))
    """When the scope's period ends (ISO 8601 UTC), or `once` for a scope that never resets."""
    threshold: Mapped[str] = mapped_column(String(32))
    """A fraction of the limit (`0.8`) or `daily_spend_above`."""
    used: Mapped[str] = mapped_column(String(32))
    limit: Mapped[str] = mapped_column(String(32))
    currency: Mapped[str] = mapped_column(String(3))
    ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivery: Mapped[str] = mapped_column(String(16), default="none")
    """Webhook delivery: none (no webhook) | pending | delivered | failed."""
    delivery_attempts: Mapped[int] = mapped_column(Integer, default=0)


class IntakeIssue(Base):
    """An issue an intake channel took, once: the row, not the issue's labels, is the truth.
    Title and body are kept as they were when queued, so later edits change nothing."""

    __tablename__ = "intake_issues"
    __table_args__ = (UniqueConstraint("repo", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    repo: Mapped[str] = mapped_column(String(200))
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    """queued → running → done | failed (failed also when the issue could not be run)."""
    title: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text, default="")
    trial_id: Mapped[str | None] = mapped_column(String(32))
    label: Mapped[str | None] = mapped_column(String(64))
    """The `autovibe:*` label this queue last put on the issue."""
    detail: Mapped[str | None] = mapped_column(Text)
    """Why it failed, or the pull request's URL."""
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class IntakeComment(Base):
    """A comment an intake channel owes an issue: written with the state change it tells of,
    posted after, and kept owed until the channel takes it (or cannot ever: `dropped`)."""

    __tablename__ = "intake_comments"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    issue_id: Mapped[int] = mapped_column(ForeignKey("intake_issues.id"), index=True)
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    posted_at: Mapped[dt.datetime | None] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    """Why the last attempt failed."""
    dropped: Mapped[bool] = mapped_column(default=False)
    """The issue can never take it (gone, or the comment refused as invalid): not retried."""


class IntakeCursor(Base):
    """Per polled resource: the ETag of its last full answer, for conditional requests."""

    __tablename__ = "intake_cursors"

    key: Mapped[str] = mapped_column(String(300), primary_key=True)
    etag: Mapped[str | None] = mapped_column(String(200))
    polled_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


def state_url(settings: Settings) -> str:
    if settings.state_url:
        return settings.state_url
    path = DataRoot.ensure(DataRoot.at(settings.data).state_db.parent) / "autovibe.sqlite"
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    add_new_columns(engine)
    return engine


def add_new_columns(engine: Engine) -> None:
    """Add the nullable columns a model gained since the DB was created (`create_all` only
    creates missing tables), so state DBs of earlier versions keep working."""
    existing = inspect(engine)
    quote = engine.dialect.identifier_preparer.quote
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            have = {c["name"] for c in existing.get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                if not column.nullable:
                    raise RuntimeError(
                        f"state DB table {table.name} lacks column {column.name}, which "
                        "cannot be added in place (not nullable); migrate it by hand"
                    )
                kind = column.type.compile(dialect=engine.dialect)
                add = f"ADD COLUMN {quote(column.name)} {kind}"
                conn.exec_driver_sql(f"ALTER TABLE {quote(table.name)} {add}")


class Store:
    """Session factory plus the few queries every caller needs."""

    def __init__(self, url: str):
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: committed on success, rolled back on any error."""
        with self._sessions() as session, session.begin():
            yield session

    def add_event(self, session: Session, trial_id: str, kind: str, **data: Any) -> None:
        session.add(Event(trial_id=trial_id, kind=kind, data=data))

    def events_after(self, trial_id: str, after: int) -> list[Event]:
        with self.session() as s:
            rows = s.scalars(
                select(Event).where(Event.trial_id == trial_id, Event.id > after).order_by(Event.id)
            )
            return list(rows)

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

from contracts.dataroot import DataRoot
from contracts.settings import Settings

TRIAL_ACTIVE = ("queued", "running")
ASSIGNMENT_DONE = ("finished", "failed", "cancelled")


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
    """queued → running → finished | failed | cancelled."""
    machine: Mapped[str | None] = mapped_column(String(32))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str | None] = mapped_column(String(16))
    """Grade: resolved | partial | unresolved (None until graded)."""
    exit_cause: Mapped[str | None] = mapped_column(String(32))
    result: Mapped[dict[str, Any] | None]
    started_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    trial: Mapped[Trial] = relationship(back_populates="assignments")


class Event(Base):
    """What happened to a trial, in order; the SSE stream replays these."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    trial_id: Mapped[str] = mapped_column(ForeignKey("trials.id"), index=True)
    ts: Mapped[dt.datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]]
    text: Mapped[str] = mapped_column(Text, default="")


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
    return engine


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

"""The forget-request ledger: one SQL table, through SQLAlchemy (SQLite file or PostgreSQL).

    from nhle.adapters.ledger import Ledger
    ledger = Ledger("sqlite:///requests.db")          # or postgresql+psycopg://user:pass@host/db
    request = ledger.submit([3], ["3"], requester="dpo@example.com", reason="GDPR art. 17", model_name="digits")
    claimed = ledger.claim(owner=new_owner(), lease_seconds=300, model_name="digits")   # pending + abandoned
    ledger.finish(request.id, owner, "done", model_version_after="4")

Life of a request: pending -> processing -> done | failed (or pending again after an error,
until max_attempts); a request refused at submission is stored as rejected, and a forgetting
that no request asked for (`nhle run --classes`) is stored done by the version that made it. A done request's
classes are *deleted on record* (`deleted_classes()`): no model that predicts them may become or
stay champion, until an operator reopens the request (`reopen`, done -> reopened), which is
stored with who, why and when in the events table beside it. Every change is one
committed transaction, and a claim is a compare-and-set on (status, claimed_by): two processing
runs can never hold the same request, on SQLite or PostgreSQL alike. A claim is a lease that
its run renews (LeaseKeeper); a claim whose lease ran out, or whose process is gone on this
host, is abandoned and the next run takes it over.

One ledger serves every registered model of a project: each request names its model
(`model_name`, the MLflow registered model), and its class indices mean that model's classes.
Rows written before requests named a model (no model_name) count as deleted for every model,
so that no class they deleted can come back through the change.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    DateTime,
    Integer,
    String,
    Text,
    TypeDecorator,
    create_engine,
    func,
    inspect,
    or_,
    select,
    text,
    true,
    update,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from nhle.core.config import is_default_model

STATUSES = ("pending", "processing", "done", "rejected", "failed", "reopened", "withdrawn")
SUPPRESSING = ("pending", "processing", "failed")
"""Statuses of an accepted request whose classes the servers suppress: until it is done (the new
version forgets them in its weights) or an operator withdraws it; a failed one stays suppressed."""


MAX_REQUESTER = 200  # the column's size: SQLite would store more, PostgreSQL would refuse it
MAX_REASON = 2000


def check_length(field: str, value: str, limit: int) -> None:
    if len(value.strip()) > limit:
        raise ValueError(f"the {field} is {len(value.strip())} characters long; at most {limit} are kept on record")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, on backends with and without time zones."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None:
            if value.tzinfo is None:
                raise ValueError("ledger times must be timezone-aware")
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=UTC) if value is not None else None


class Base(DeclarativeBase):
    pass


class ForgetRequestRow(Base):
    __tablename__ = "forget_requests"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    classes: Mapped[str] = mapped_column(Text)  # JSON list of class indices
    class_names: Mapped[str] = mapped_column(Text)  # JSON list of their names
    requester: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)
    submitted_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    model_version_before: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model_version_after: Mapped[str | None] = mapped_column(String(64), nullable=True)
    data_version_before: Mapped[str | None] = mapped_column(Text, nullable=True)  # JSON DataVersion
    data_version_after: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    report_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    batch: Mapped[str | None] = mapped_column(String(100), nullable=True, index=True)
    claimed_by: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(200), nullable=True, index=True)  # None: written before


class LedgerEventRow(Base):
    """What happened to a request besides its status: an operator reopened or withdrew it, the
    servers were told to suppress its classes."""

    __tablename__ = "forget_request_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[int] = mapped_column(Integer, index=True)
    kind: Mapped[str] = mapped_column(String(32))
    operator: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    detail: Mapped[str] = mapped_column(Text)  # JSON


@dataclass(frozen=True)
class LedgerEvent:
    id: int
    request_id: int
    kind: str
    operator: str
    reason: str
    at: datetime
    detail: dict

    def as_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "at": self.at.isoformat()}


@dataclass(frozen=True)
class ForgetRequest:
    """A snapshot of one ledger row (plain values, safe to pass around after the session closes)."""

    id: int
    classes: list
    class_names: list
    requester: str
    reason: str
    status: str
    submitted_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    model_version_before: str | None
    model_version_after: str | None
    data_version_before: dict | None
    data_version_after: dict | None
    error: str | None
    report_uri: str | None
    attempts: int
    batch: str | None
    claimed_by: str | None
    lease_until: datetime | None
    model_name: str | None

    @classmethod
    def from_row(cls, row: ForgetRequestRow) -> ForgetRequest:
        values = {f.name: getattr(row, f.name) for f in fields(cls)}
        for key in ("classes", "class_names", "data_version_before", "data_version_after"):
            values[key] = json.loads(values[key]) if values[key] is not None else None
        return cls(**values)

    def as_dict(self) -> dict:
        return {
            f.name: (v.isoformat() if isinstance(v := getattr(self, f.name), datetime) else v) for f in fields(self)
        }


def operator_name() -> str:
    """user@host of this process: who did what the ledger records, unless told otherwise."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def new_owner() -> str:
    """host:pid:random - who holds a claim; the host and pid let a run on the same host see that
    the claimant process is gone."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_is_gone(owner: str | None) -> bool:
    """True when `owner` names a process on this host that no longer exists."""
    try:
        host, pid, _ = (owner or "").rsplit(":", 2)
        pid = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _json(value) -> str | None:
    return json.dumps(value) if value is not None else None


def create_tables(engine, attempts: int = 5) -> None:
    """Create the ledger's tables where missing. Processes that open a new database at once (servers
    started side by side) race: create_all checks, then creates, so the one that lost sees "table
    already exists" (SQLite) or a duplicate type (PostgreSQL). It looks again and creates what is
    still missing; a failure that leaves a table missing after every attempt is raised."""
    for attempt in range(attempts):
        try:
            Base.metadata.create_all(engine)
            break
        except DBAPIError:
            missing = set(Base.metadata.tables) - set(inspect(engine).get_table_names())
            if not missing:
                break
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    add_missing_columns(engine)


def add_missing_columns(engine) -> None:
    """Columns added to the request table since a ledger was created (model_name), added in
    place, nullable, so that every row on record is kept as it is."""
    present = {c["name"] for c in inspect(engine).get_columns(ForgetRequestRow.__tablename__)}
    for column in ForgetRequestRow.__table__.columns:
        if column.name not in present:
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as connection:
                    connection.execute(
                        text(f"ALTER TABLE {ForgetRequestRow.__tablename__} ADD COLUMN {column.name} {kind}")
                    )
            except DBAPIError:  # another process added it in the meantime
                if column.name not in {c["name"] for c in inspect(engine).get_columns(ForgetRequestRow.__tablename__)}:
                    raise


def of_model(model_name: str | None, legacy: bool = True):
    """The rows of one registered model, and (legacy) those written before requests named one."""
    if model_name is None:
        return true()
    if not legacy:
        return ForgetRequestRow.model_name == model_name
    return or_(ForgetRequestRow.model_name == model_name, ForgetRequestRow.model_name.is_(None))


class Ledger:
    def __init__(self, url: str):
        if not url or "://" not in url:
            raise ValueError(
                f"the request database must be an SQLAlchemy URL such as sqlite:///requests.db, got {url!r}"
            )
        sqlite = url.startswith("sqlite")
        self.url = url
        # SQLite: a connection per session (NullPool), so a ledger file restored or replaced on disk
        # is what the next read sees, not the inode a pooled connection still holds.
        self.engine = create_engine(url, **({"connect_args": {"timeout": 30}, "poolclass": NullPool} if sqlite else {}))
        create_tables(self.engine)

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    def submit(
        self,
        classes: list[int],
        class_names: list[str],
        requester: str,
        reason: str,
        *,
        model_name: str,
        status: str = "pending",
        error: str | None = None,
        model_version_before: str | None = None,
        model_version_after: str | None = None,
    ) -> ForgetRequest:
        """Record a request on the registered model `model_name` (committed before this returns).
        status is pending, rejected, or done: a forgetting no request asked for (`nhle run
        --classes`), put on record by the version `model_version_after` that forgot it."""
        if not str(model_name or "").strip():
            raise ValueError("a forget request names the registered model it is for (model_name)")
        if status not in ("pending", "rejected", "done") or (status == "done") != (model_version_after is not None):
            raise ValueError(
                f"a new request is pending or rejected, or done with the version that forgot its classes, "
                f"not {status!r} (model_version_after {model_version_after!r})"
            )
        if not requester.strip() or not reason.strip():
            raise ValueError("a forget request needs a requester and a reason")
        check_length("requester", requester, MAX_REQUESTER)
        check_length("reason", reason, MAX_REASON)
        now = utcnow()
        row = ForgetRequestRow(
            classes=json.dumps([int(c) for c in classes]),
            class_names=json.dumps(class_names),
            requester=requester.strip(),
            reason=reason.strip(),
            status=status,
            submitted_at=now,
            finished_at=now if status != "pending" else None,
            error=error,
            model_version_before=model_version_before,
            model_version_after=model_version_after,
            attempts=0,
            model_name=model_name.strip(),
        )
        with self._session() as session, session.begin():
            session.add(row)
        return ForgetRequest.from_row(row)

    def get(self, request_id: int) -> ForgetRequest:
        with self._session() as session:
            row = session.get(ForgetRequestRow, int(request_id))
            if row is None:
                raise KeyError(f"no forget request with id {request_id} in {self.engine.url!r}")
            return ForgetRequest.from_row(row)

    def list(self, status: str | None = None, model_name: str | None = None) -> list[ForgetRequest]:
        """The requests (with `status`; of `model_name` and the rows that name no model), oldest first."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; choose one of {', '.join(STATUSES)}")
        query = select(ForgetRequestRow).where(of_model(model_name)).order_by(ForgetRequestRow.id)
        if status is not None:
            query = query.where(ForgetRequestRow.status == status)
        with self._session() as session:
            return [ForgetRequest.from_row(row) for row in session.scalars(query)]

    def claim(self, owner: str, lease_seconds: float, model_name: str | None = None) -> list[ForgetRequest]:
        """Take every pending request and every abandoned processing one (of `model_name`; those
        that name no model go to the project's default model, the only one there was) for `owner`.

        Each row is taken with a compare-and-set UPDATE, so a row another run took in the
        meantime is skipped. Abandoned rows keep their batch: the run that takes them over looks
        for the model version that batch may already have registered."""
        now = utcnow()
        with self._session() as session:
            candidates = [
                (row.id, row.status, row.claimed_by, row.lease_until)
                for row in session.scalars(
                    select(ForgetRequestRow).where(
                        ForgetRequestRow.status.in_(("pending", "processing")),
                        of_model(model_name, legacy=is_default_model(model_name)),
                    )
                )
            ]
        taken = []
        for request_id, status, claimant, lease_until in candidates:
            if status == "processing" and not (lease_until is None or lease_until < now or owner_is_gone(claimant)):
                continue  # a live run holds it
            with self._session() as session, session.begin():
                result = session.execute(
                    update(ForgetRequestRow)
                    .where(
                        ForgetRequestRow.id == request_id,
                        ForgetRequestRow.status == status,
                        (ForgetRequestRow.claimed_by == claimant)
                        if claimant is not None
                        else ForgetRequestRow.claimed_by.is_(None),
                    )
                    .values(
                        status="processing",
                        claimed_by=owner,
                        lease_until=now + timedelta(seconds=lease_seconds),
                        started_at=func.coalesce(ForgetRequestRow.started_at, now),
                    )
                )
            if result.rowcount == 1:
                taken.append(request_id)
        return [self.get(i) for i in taken]

    def renew(self, owner: str, lease_seconds: float) -> int:
        """Extend the lease of every request `owner` holds; returns how many it holds."""
        with self._session() as session, session.begin():
            return session.execute(
                update(ForgetRequestRow)
                .where(ForgetRequestRow.claimed_by == owner, ForgetRequestRow.status == "processing")
                .values(lease_until=utcnow() + timedelta(seconds=lease_seconds))
            ).rowcount

    def _update_held(self, request_id: int, owner: str, **values) -> ForgetRequest:
        with self._session() as session, session.begin():
            result = session.execute(
                update(ForgetRequestRow)
                .where(
                    ForgetRequestRow.id == request_id,
                    ForgetRequestRow.claimed_by == owner,
                    ForgetRequestRow.status == "processing",
                )
                .values(**values)
            )
        if result.rowcount != 1:
            raise RuntimeError(f"forget request {request_id} is no longer held by {owner}: another run took it over")
        return self.get(request_id)

    def record(self, request_id: int, owner: str, **values) -> ForgetRequest:
        """Store progress on a held request: batch, model_version_before, data_version_before."""
        allowed = {"batch", "model_version_before", "data_version_before"}
        if set(values) - allowed:
            raise ValueError(f"record() sets only {sorted(allowed)}")
        if "data_version_before" in values:
            values["data_version_before"] = _json(values["data_version_before"])
        return self._update_held(request_id, owner, **values)

    def finish(
        self,
        request_id: int,
        owner: str,
        status: str,
        *,
        model_version_after: str | None = None,
        data_version_after: dict | None = None,
        report_uri: str | None = None,
        error: str | None = None,
    ) -> ForgetRequest:
        """Close a held request as done or failed."""
        if status not in ("done", "failed"):
            raise ValueError(f"a processed request ends done or failed, not {status!r}")
        return self._update_held(
            request_id,
            owner,
            status=status,
            finished_at=utcnow(),
            model_version_after=model_version_after,
            data_version_after=_json(data_version_after),
            report_uri=report_uri,
            error=error,
            claimed_by=None,
            lease_until=None,
        )

    def release(self, request_id: int, owner: str, error: str, max_attempts: int) -> ForgetRequest:
        """An error stopped the run: back to pending for the next run, or failed after max_attempts."""
        current = self.get(request_id)
        attempts = current.attempts + 1
        status = "failed" if attempts >= max_attempts else "pending"
        return self._update_held(
            request_id,
            owner,
            status=status,
            attempts=attempts,
            error=error,
            claimed_by=None,
            lease_until=None,
            finished_at=utcnow() if status == "failed" else None,
        )

    def deleted_classes(self, model_name: str | None) -> dict[int, list[int]]:
        """Classes of `model_name` deleted on record: {class: [ids of the done requests that
        deleted it]}, rows that name no model included; None: every model's."""
        deleted: dict[int, list[int]] = {}
        for request in self.list("done", model_name):
            for c in request.classes:
                deleted.setdefault(int(c), []).append(request.id)
        return deleted

    def suppressed_classes(self, model_name: str | None) -> dict[int, list[int]]:
        """Classes of `model_name` accepted for deletion and not deleted yet: {class: [ids of the
        pending, processing or failed requests that name it]}; servers never answer them."""
        suppressed: dict[int, list[int]] = {}
        for status in SUPPRESSING:
            for request in self.list(status, model_name):
                for c in request.classes:
                    suppressed.setdefault(int(c), []).append(request.id)
        return suppressed

    def reopen(
        self, request_id: int, operator: str, reason: str, detail: dict | None = None, recorded_elsewhere: bool = False
    ) -> LedgerEvent:
        """An operator takes back a done request: its classes are no longer deleted on record.
        The status change and the event (who, why, when, detail) are one transaction.
        recorded_elsewhere: the request is known only to the registered model's own record (this
        ledger was lost and made anew); the event alone is stored."""
        return self._operator_change(request_id, "reopened", ("done",), operator, reason, detail, recorded_elsewhere)

    def withdraw(self, request_id: int, operator: str, reason: str) -> LedgerEvent:
        """An operator takes back an accepted request not being processed (pending, or failed):
        it is withdrawn and its classes are no longer suppressed. One transaction with the event."""
        return self._operator_change(request_id, "withdrawn", ("pending", "failed"), operator, reason)

    def _operator_change(
        self,
        request_id: int,
        status: str,
        allowed: tuple[str, ...],
        operator: str,
        reason: str,
        detail: dict | None = None,
        recorded_elsewhere: bool = False,
    ) -> LedgerEvent:
        verb = {"reopened": "reopening", "withdrawn": "withdrawing"}[status]
        if not operator.strip() or not reason.strip():
            raise ValueError(f"{verb} a forget request needs an operator and a reason, both non-empty")
        check_length("operator", operator, MAX_REQUESTER)
        check_length("reason", reason, MAX_REASON)
        row = LedgerEventRow(
            request_id=int(request_id),
            kind=status,
            operator=operator.strip(),
            reason=reason.strip(),
            at=utcnow(),
            detail=json.dumps(detail or {}),
        )
        with self._session() as session, session.begin():
            result = session.execute(
                update(ForgetRequestRow)
                .where(ForgetRequestRow.id == int(request_id), ForgetRequestRow.status.in_(allowed))
                .values(status=status)
            )
            current = session.get(ForgetRequestRow, int(request_id)) if result.rowcount != 1 else None
            if result.rowcount != 1 and not (current is None and recorded_elsewhere):
                raise ValueError(
                    f"forget request {request_id} cannot be {status}: "
                    + (
                        "it does not exist"
                        if current is None
                        else f"it is {current.status}, not {' or '.join(allowed)}"
                    )
                )
            session.add(row)
        return self._event(row)

    def note(self, request_id: int, kind: str, operator: str, reason: str, detail: dict) -> LedgerEvent:
        """An event of a request that changes nothing (kind "suppressed": which servers stopped
        answering its classes, and when)."""
        row = LedgerEventRow(
            request_id=int(request_id),
            kind=kind,
            operator=operator.strip()[:MAX_REQUESTER],
            reason=reason.strip()[:MAX_REASON],
            at=utcnow(),
            detail=json.dumps(detail),
        )
        with self._session() as session, session.begin():
            session.add(row)
        return self._event(row)

    def events(self, request_id: int | None = None) -> list[LedgerEvent]:
        query = select(LedgerEventRow).order_by(LedgerEventRow.id)
        if request_id is not None:
            query = query.where(LedgerEventRow.request_id == int(request_id))
        with self._session() as session:
            return [self._event(row) for row in session.scalars(query)]

    @staticmethod
    def _event(row: LedgerEventRow) -> LedgerEvent:
        return LedgerEvent(row.id, row.request_id, row.kind, row.operator, row.reason, row.at, json.loads(row.detail))


class LeaseKeeper:
    """Renews `owner`'s claims every lease_seconds / 3 in a daemon thread while the block runs."""

    def __init__(self, ledger: Ledger, owner: str, lease_seconds: float):
        self.ledger, self.owner, self.lease_seconds = ledger, owner, lease_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nhle-lease", daemon=True)

    def _run(self):
        while not self._stop.wait(self.lease_seconds / 3):
            try:
                self.ledger.renew(self.owner, self.lease_seconds)
            except Exception:  # a missed renewal only shortens the lease; the next one may succeed
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


__all__ = [
    "ForgetRequest",
    "Ledger",
    "LedgerEvent",
    "LeaseKeeper",
    "STATUSES",
    "new_owner",
    "operator_name",
    "owner_is_gone",
]

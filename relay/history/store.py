"""The history database: SQLite (a file beside the spool, WAL) or PostgreSQL (psycopg 3),
through SQLAlchemy Core; its schema upgraded in place by alembic on opening.

Writes come in batches of operations (rows.py) from one writer; reads are the searches the
console and the API make."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    func,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from relay.history.rows import Op
from relay.history.schema import UID, VALUE, deliveries, events, objects, studies

log = logging.getLogger("relay.history")
MIGRATIONS = Path(__file__).parent / "migrations"
# Delivery states a study page counts per destination.
STATES = ("delivered", "queued", "held", "failed")


def database_url(url: str) -> str:
    """The SQLAlchemy URL: postgresql:// goes through psycopg 3 (the driver we install)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _cut(value: Any, limit: int) -> Any:
    return value[:limit] if isinstance(value, str) else value


@dataclass
class StudyRow:
    study_instance_uid: str
    patient_id: str
    patient_id_sent: str
    patient_name: str
    accession_number: str
    calling_ae: str
    first_received: float | None
    last_event: float | None
    instances: int = 0
    destinations: dict[str, dict[str, int]] = field(default_factory=dict)


class HistoryStore:
    def __init__(self, url: str, relay: str, *, connect_timeout: float = 5.0) -> None:
        self.url = database_url(url)
        self.relay = relay
        self.is_sqlite = self.url.startswith("sqlite")
        if self.is_sqlite:
            self.engine: Engine = create_engine(
                self.url, connect_args={"timeout": 5.0, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            # A database that does not answer must not hold the writer for long: it keeps
            # the batch aside and tries again later.
            self.engine = create_engine(
                self.url, pool_pre_ping=True, pool_size=4, max_overflow=4,
                connect_args={"connect_timeout": int(max(1, connect_timeout)),
                              "options": "-c statement_timeout=30000",
                              "keepalives": 1, "keepalives_idle": 10,
                              "keepalives_interval": 5, "keepalives_count": 3})
        self._insert = sqlite.insert if self.is_sqlite else postgresql.insert

    # --- schema ------------------------------------------------------------------------------

    def upgrade(self) -> None:
        """Create the tables, or bring an older schema up to date (alembic, in place)."""
        # alembic narrates every migration at INFO: one line of ours says it instead.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        before = self.revision_or_none()
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if not self.is_sqlite:
                # Relays sharing one database start together: one upgrades, the others
                # wait for it, then find nothing to do.
                conn.execute(text("SELECT pg_advisory_xact_lock(4242424242)"))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
        after = self.revision_or_none()
        if after != before:
            log.info("history database %s: schema %s -> %s",
                     self.engine.url.render_as_string(hide_password=True),
                     before or "(none)", after)

    def revision_or_none(self) -> str | None:
        try:
            return self.revision()
        except SQLAlchemyError:
            return None

    def revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def close(self) -> None:
        self.engine.dispose()

    # --- writing -----------------------------------------------------------------------------

    def apply(self, ops: Sequence[Op]) -> None:
        """One batch, one transaction. Operations on the same row keep the last one (their
        order is the events' order)."""
        if not ops:
            return
        with self.engine.begin() as conn:
            self._apply(conn, ops)

    def _apply(self, conn: Connection, ops: Sequence[Op]) -> None:
        relay = self.relay
        received: dict[str, dict[str, Any]] = {}
        states: dict[str, dict[str, Any]] = {}
        sent_ids: dict[str, str] = {}
        delivered: dict[tuple[str, str], dict[str, Any]] = {}
        lines: list[dict[str, Any]] = []
        touched: dict[str, float] = {}
        for kind, row in ops:
            obj = _cut(row["obj"], VALUE)
            when = float(row.get("time") or 0.0)
            touched[obj] = max(touched.get(obj, 0.0), when)
            if kind == "object":
                received[obj] = row
                states.pop(obj, None)
            elif kind == "object_state":
                states[obj] = row
            elif kind == "sent_patient_id":
                sent_ids[obj] = row["patient_id"]
            elif kind == "delivery":
                delivered[(obj, _cut(row["destination"], UID))] = row
            elif kind == "event":
                lines.append({
                    "relay": relay, "time": when, "step": row["step"], "obj": obj,
                    "destination": _cut(row.get("destination"), UID),
                    "status": _cut(row.get("status"), 64),
                    "reason": _cut(row.get("reason"), VALUE), "detail": row.get("detail"),
                    "actor": _cut(row.get("actor"), UID)})
        if received:
            self._objects(conn, received)
            self._studies(conn, received.values())
        if states:
            conn.execute(
                update(objects).where(and_(objects.c.relay == relay,
                                           objects.c.obj == bindparam("o")))
                .values(state=bindparam("s")),
                [{"o": o, "s": r["state"]} for o, r in states.items()])
        if sent_ids:
            study = (select(objects.c.study_instance_uid)
                     .where(and_(objects.c.relay == relay, objects.c.obj == bindparam("o")))
                     .scalar_subquery())
            conn.execute(update(studies).where(studies.c.study_instance_uid == study)
                         .values(patient_id_sent=bindparam("p")),
                         [{"o": o, "p": _cut(p, VALUE)} for o, p in sent_ids.items()])
        if delivered:
            stmt = self._insert(deliveries)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["relay", "obj", "destination"],
                    set_={"state": stmt.excluded.state, "status": stmt.excluded.status,
                          "updated": stmt.excluded.updated},
                    # A batch replayed late from the backlog never undoes a later state.
                    where=stmt.excluded.updated >= deliveries.c.updated),
                [{"relay": relay, "obj": o, "destination": d, "state": r["state"],
                  "status": _cut(r.get("status"), 64), "updated": float(r["time"])}
                 for (o, d), r in delivered.items()])
        if lines:
            conn.execute(events.insert(), lines)
        self._touch(conn, touched)

    def _objects(self, conn: Connection, received: dict[str, dict[str, Any]]) -> None:
        stmt = self._insert(objects)
        columns = ("sop_instance_uid", "sop_class_uid", "series_instance_uid",
                   "study_instance_uid", "modality", "calling_ae", "size", "received",
                   "state", "updated")
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["relay", "obj"],
                                       set_={c: stmt.excluded[c] for c in columns}),
            [{"relay": self.relay, "obj": o,
              "sop_instance_uid": _cut(r.get("sop_instance_uid"), UID),
              "sop_class_uid": _cut(r.get("sop_class_uid"), UID),
              "series_instance_uid": _cut(r.get("series_instance_uid"), UID),
              "study_instance_uid": _cut(r.get("study_instance_uid"), UID),
              "modality": _cut(r.get("modality"), 16),
              "calling_ae": _cut(r.get("calling_ae"), 64), "size": r.get("size"),
              "received": r.get("received"), "state": "received",
              "updated": float(r["time"])} for o, r in received.items()])

    def _studies(self, conn: Connection, received: Iterable[dict[str, Any]]) -> None:
        """One row per study as received: its patient values from its first object; the
        first arrival the earliest of any relay's."""
        rows: dict[str, dict[str, Any]] = {}
        for r in received:
            uid = _cut(r.get("study_instance_uid") or "", UID)
            if not uid:
                continue
            first = float(r.get("received") or r["time"])
            row = rows.get(uid)
            if row is None:
                name = _cut(r.get("patient_name") or "", VALUE)
                rows[uid] = {"study_instance_uid": uid,
                             "patient_id": _cut(r.get("patient_id") or "", VALUE),
                             "patient_id_sent": _cut(r.get("patient_id") or "", VALUE),
                             "patient_name": name, "patient_name_folded": name.casefold(),
                             "accession_number": _cut(r.get("accession_number") or "", VALUE),
                             "calling_ae": _cut(r.get("calling_ae") or "", 64),
                             "first_received": first, "last_event": float(r["time"])}
            else:
                row["first_received"] = min(row["first_received"], first)
                row["last_event"] = max(row["last_event"], float(r["time"]))
        if not rows:
            return
        stmt = self._insert(studies)
        x = stmt.excluded
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["study_instance_uid"],
                set_={"first_received": case((x.first_received < studies.c.first_received,
                                              x.first_received),
                                             else_=studies.c.first_received),
                      "last_event": case((x.last_event > studies.c.last_event, x.last_event),
                                         else_=studies.c.last_event)}),
            list(rows.values()))

    def _touch(self, conn: Connection, touched: dict[str, float]) -> None:
        """Objects and their studies: when something last happened to them."""
        if not touched:
            return
        when = max(touched.values())
        names = list(touched)
        for i in range(0, len(names), 500):
            chunk = names[i:i + 500]
            mine = and_(objects.c.relay == self.relay, objects.c.obj.in_(chunk))
            conn.execute(update(objects).where(mine).values(updated=when))
            conn.execute(
                update(studies)
                .where(studies.c.study_instance_uid.in_(
                    select(objects.c.study_instance_uid).where(mine).distinct()))
                .where(or_(studies.c.last_event.is_(None), studies.c.last_event < when))
                .values(last_event=when))

    def prune(self, older_than: float) -> int:
        """Forget what happened before `older_than` (wall clock): [history] keep_days."""
        with self.engine.begin() as conn:
            n = conn.execute(delete(events).where(events.c.time < older_than)).rowcount
            conn.execute(delete(deliveries).where(deliveries.c.updated < older_than))
            conn.execute(delete(objects).where(objects.c.updated < older_than))
            conn.execute(delete(studies).where(studies.c.last_event < older_than))
        return int(n or 0)

    # --- reading -----------------------------------------------------------------------------

    def search(self, q: str = "", limit: int = 50) -> list[StudyRow]:
        """Studies whose PatientID (as received or as sent), AccessionNumber or
        StudyInstanceUID is `q`, or whose PatientName starts with it (any case); newest
        first. Empty: the latest studies."""
        stmt = select(studies)
        q = q.strip()
        if q:
            # A name's beginning as a range, not LIKE: an index serves it on both databases
            # (SQLite's LIKE is case-insensitive and would read every row).
            prefix = q.casefold()
            stmt = stmt.where(or_(studies.c.patient_id == q, studies.c.patient_id_sent == q,
                                  studies.c.accession_number == q,
                                  studies.c.study_instance_uid == q,
                                  and_(studies.c.patient_name_folded >= prefix,
                                       studies.c.patient_name_folded < prefix + "\U0010ffff")))
        stmt = stmt.order_by(studies.c.last_event.desc()).limit(limit)
        with self.engine.connect() as conn:
            rows = [_study(r) for r in conn.execute(stmt).mappings()]
            self._counts(conn, rows)
        return rows

    def study(self, uid: str) -> StudyRow | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(studies).where(studies.c.study_instance_uid == uid)
                               ).mappings().first()
            if row is None:
                return None
            found = [_study(row)]
            self._counts(conn, found)
        return found[0]

    def _counts(self, conn: Connection, rows: list[StudyRow]) -> None:
        if not rows:
            return
        by_uid = {r.study_instance_uid: r for r in rows}
        of_study = objects.c.study_instance_uid.in_(list(by_uid))
        for uid, n in conn.execute(
                select(objects.c.study_instance_uid,
                       func.count(objects.c.sop_instance_uid.distinct()))
                .where(of_study).group_by(objects.c.study_instance_uid)):
            by_uid[uid].instances = int(n)
        joined = objects.join(deliveries, and_(deliveries.c.relay == objects.c.relay,
                                               deliveries.c.obj == objects.c.obj))
        for uid, dest, state, n in conn.execute(
                select(objects.c.study_instance_uid, deliveries.c.destination,
                       deliveries.c.state, func.count())
                .select_from(joined).where(of_study)
                .group_by(objects.c.study_instance_uid, deliveries.c.destination,
                          deliveries.c.state)):
            counts = by_uid[uid].destinations.setdefault(dest, dict.fromkeys(STATES, 0))
            if state in counts:
                counts[state] += int(n)

    def timeline(self, uid: str, limit: int = 5000) -> list[dict[str, Any]]:
        """A study's events, oldest first, each with its object's SOP Instance UID and
        series."""
        joined = events.join(objects, and_(objects.c.relay == events.c.relay,
                                           objects.c.obj == events.c.obj))
        stmt = (select(events.c.time, events.c.step, events.c.obj, events.c.destination,
                       events.c.status, events.c.reason, events.c.detail, events.c.relay,
                       events.c.actor, objects.c.sop_instance_uid,
                       objects.c.series_instance_uid, objects.c.modality)
                .select_from(joined).where(objects.c.study_instance_uid == uid)
                .order_by(events.c.time, events.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def objects_of(self, uid: str) -> list[dict[str, Any]]:
        """The objects of a study as received (every relay's), with their states."""
        stmt = (select(objects).where(objects.c.study_instance_uid == uid)
                .order_by(objects.c.series_instance_uid, objects.c.received))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(stmt).mappings()]

    def delivered_per_destination(self, since: float) -> dict[str, int]:
        stmt = (select(events.c.destination, func.count()).where(
            and_(events.c.step == "delivered", events.c.time >= since))
            .group_by(events.c.destination))
        with self.engine.connect() as conn:
            return {d: int(n) for d, n in conn.execute(stmt) if d}

    def last_error(self, destination: str) -> dict[str, Any] | None:
        # One indexed look-up per step (ix_events_destination_step_time): a destination
        # with a million deliveries and no error is answered at once.
        found = []
        with self.engine.connect() as conn:
            for step in ("failed", "deferred"):
                row = conn.execute(
                    select(events.c.time, events.c.step, events.c.status, events.c.reason,
                           events.c.detail)
                    .where(and_(events.c.destination == destination, events.c.step == step))
                    .order_by(events.c.time.desc()).limit(1)).mappings().first()
                if row is not None:
                    found.append(dict(row))
        return max(found, key=lambda r: r["time"]) if found else None

    def throughput(self, since: float, bucket: float = 600.0) -> list[tuple[float, int]]:
        """Objects delivered per bucket of `bucket` seconds since `since` (the chart)."""
        slot = func.floor(events.c.time / bucket)
        stmt = (select(slot, func.count()).where(
            and_(events.c.step == "delivered", events.c.time >= since))
            .group_by(slot).order_by(slot))
        with self.engine.connect() as conn:
            return [(float(s) * bucket, int(n)) for s, n in conn.execute(stmt)]

    def object(self, obj: str) -> dict[str, Any] | None:
        """This relay's object of that spool name, as received."""
        with self.engine.connect() as conn:
            row = conn.execute(select(objects).where(
                and_(objects.c.relay == self.relay, objects.c.obj == obj))).mappings().first()
        return None if row is None else dict(row)

    def objects_named(self, uid: str) -> set[str]:
        """The spool names of this relay's objects of a study (as received)."""
        with self.engine.connect() as conn:
            return set(conn.execute(select(objects.c.obj).where(
                and_(objects.c.relay == self.relay,
                     objects.c.study_instance_uid == uid))).scalars())

    def study_of(self, obj: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(objects.c.study_instance_uid).where(
                and_(objects.c.relay == self.relay, objects.c.obj == obj))).scalar()


def _study(r: Any) -> StudyRow:
    return StudyRow(study_instance_uid=r["study_instance_uid"],
                    patient_id=r["patient_id"] or "",
                    patient_id_sent=r["patient_id_sent"] or "",
                    patient_name=r["patient_name"] or "",
                    accession_number=r["accession_number"] or "",
                    calling_ae=r["calling_ae"] or "", first_received=r["first_received"],
                    last_event=r["last_event"])


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL: readers (the console) never wait for the writer; NORMAL: a power cut may lose
    # the last batches of history, never the database (the spool is the truth).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def now() -> float:
    return time.time()

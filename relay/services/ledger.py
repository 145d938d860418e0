"""Storage commitment's memory: what became of each instance the relay received, and the
transactions modalities asked it to commit. A SQLite file in the spool
(spool/commitment.sqlite), so that both survive kill -9 and a restart, and so that every relay
process of one spool reads the same: the process that handles objects writes the outcomes
(it subscribes to the event stream), a receive-only process (the embedded receiver's child)
that took an N-ACTION reads them.

What "committed" means is the pure function `verdict`: an instance is committed once every
destination it was routed to confirmed it (C-STORE or STOW-RS success; for a destination with
`commitment = true`, that PACS's own commitment), failed once it was quarantined, unrouted, or
refused by a destination, and otherwise still pending, until the transaction's deadline.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread

from relay.events import (
    Delivered,
    Event,
    Failed,
    Received,
    Requeued,
    Routed,
    Subscriber,
    Unrouted,
)
from relay.spool import Spool

LEDGER = "commitment.sqlite"

# Failure Reasons of the Failed SOP Sequence (PS3.3 C.14.1.1, PS3.4 J.3.2.1.1.2).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
RESOURCE_LIMITATION = 0x0213
CLASS_INSTANCE_CONFLICT = 0x0119

SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    obj TEXT PRIMARY KEY,          -- the spool's name of the object
    sop TEXT NOT NULL,             -- SOP Instance UID as received
    sop_class TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL,
    state TEXT NOT NULL,           -- received | routed | failed | unrouted
    routed TEXT NOT NULL DEFAULT '[]',  -- JSON list of destinations
    reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ix_objects_sop ON objects (sop);
CREATE INDEX IF NOT EXISTS ix_objects_time ON objects (time);
CREATE TABLE IF NOT EXISTS confirmations (
    obj TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,           -- delivered | committed | failed
    sent_uid TEXT NOT NULL DEFAULT '',  -- the SOP Instance UID of the copy it got
    sent_class TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL,
    asked REAL,                    -- commitment asked of that PACS (commitment = true)
    PRIMARY KEY (obj, destination)
);
CREATE INDEX IF NOT EXISTS ix_confirmations_sent ON confirmations (destination, sent_uid);
CREATE TABLE IF NOT EXISTS transactions (
    uid TEXT PRIMARY KEY,          -- the modality's Transaction UID
    requester TEXT NOT NULL,       -- its calling AE title
    host TEXT NOT NULL,
    created REAL NOT NULL,
    deadline REAL NOT NULL,
    instances TEXT NOT NULL,       -- JSON [[class UID, instance UID], ...]
    owner INTEGER,                 -- pid of the process holding its association open
    attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS totals (   -- one row: instances reported since the spool began
    id INTEGER PRIMARY KEY CHECK (id = 1),
    committed INTEGER NOT NULL,
    failed INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, committed, failed) VALUES (1, 0, 0);
"""


@dataclass(frozen=True)
class Instance:
    """One object of the request: its verdict."""

    sop_class: str
    sop_instance: str
    state: str  # committed | failed | pending
    reason: int = 0  # Failure Reason where failed
    why: str = ""


@dataclass(frozen=True)
class Outcome:
    """An object's rows, as verdict reads them."""

    state: str
    routed: tuple[str, ...]
    reason: str
    confirmations: dict[str, tuple[str, str]]  # destination -> (state, reason)


def verdict(sop_class: str, sop_instance: str, outcomes: Sequence[Outcome],
            committing: frozenset[str], expired: bool) -> Instance:
    """Whether one instance of a request is committed, failed or still pending. `outcomes`:
    the objects received with that SOP Instance UID (a modality may send one twice);
    `committing`: the destinations whose own commitment counts (commitment = true). Any copy
    committed commits it; it fails once every copy failed, or at the deadline (`expired`)."""
    failures: list[tuple[int, str]] = []
    pending = False
    for o in outcomes:
        if o.state == "failed":
            failures.append((PROCESSING_FAILURE, f"quarantined: {o.reason}"))
            continue
        if o.state == "unrouted":
            failures.append((PROCESSING_FAILURE, "no destination takes it (unrouted)"))
            continue
        if o.state != "routed":
            pending = True
            continue
        missing = False
        refused = ""
        for dest in o.routed:
            state, reason = o.confirmations.get(dest, ("", ""))
            if state == "failed":
                refused = f"{dest}: {reason}"
                break
            wanted = "committed" if dest in committing else "delivered"
            if state != wanted and not (state == "committed" and wanted == "delivered"):
                missing = True
        if refused:
            failures.append((PROCESSING_FAILURE, refused))
        elif missing:
            pending = True
        else:
            return Instance(sop_class, sop_instance, "committed")
    if pending and not expired:
        return Instance(sop_class, sop_instance, "pending")
    if pending:
        return Instance(sop_class, sop_instance, "failed", PROCESSING_FAILURE,
                        "not confirmed by every destination before [commitment].timeout")
    if failures:
        code, why = failures[-1]
        return Instance(sop_class, sop_instance, "failed", code, why)
    if not expired:
        return Instance(sop_class, sop_instance, "pending")
    return Instance(sop_class, sop_instance, "failed", NO_SUCH_OBJECT_INSTANCE,
                    "never received by the relay")


@dataclass
class Transaction:
    uid: str
    requester: str
    host: str
    created: float
    deadline: float
    instances: list[tuple[str, str]]
    owner: int | None
    attempts: int
    next_try: float
    last_error: str


class Ledger:
    """The SQLite file; safe to use from several threads (one connection, a lock) and several
    processes (SQLite's own locking, WAL)."""

    def __init__(self, spool_root: Path) -> None:
        self.path = spool_root / LEDGER
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL without a sync per commit: a kill -9 loses nothing (the OS has the pages), a
        # power cut may lose the last moments, as for the history.
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._db.executescript(SCHEMA)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _run(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def _many(self, statements: Iterable[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- instances --------------------------------------------------------------------------

    def received(self, obj: str, sop: str, sop_class: str) -> None:
        self._run("INSERT INTO objects (obj, sop, sop_class, time, state) VALUES (?,?,?,?,"
                  "'received') ON CONFLICT (obj) DO UPDATE SET state='received', routed='[]',"
                  " reason='', sop=excluded.sop, sop_class=excluded.sop_class, "
                  "time=excluded.time", (obj, sop, sop_class, time.time()))

    def routed(self, obj: str, to: Sequence[str]) -> None:
        self._run("UPDATE objects SET state='routed', routed=?, time=? WHERE obj=?",
                  (json.dumps(list(to)), time.time(), obj))

    def object_failed(self, obj: str, sop: str, state: str, reason: str) -> None:
        self._run("INSERT INTO objects (obj, sop, time, state, reason) VALUES (?,?,?,?,?) "
                  "ON CONFLICT (obj) DO UPDATE SET state=excluded.state, "
                  "reason=excluded.reason, time=excluded.time", (obj, sop, time.time(), state,
                                                                 reason))

    def confirmed(self, obj: str, destination: str, state: str, sent_uid: str = "",
                  sent_class: str = "", reason: str = "") -> None:
        self._run("INSERT INTO confirmations (obj, destination, state, sent_uid, sent_class, "
                  "reason, time) VALUES (?,?,?,?,?,?,?) ON CONFLICT (obj, destination) DO "
                  "UPDATE SET state=excluded.state, reason=excluded.reason, time=excluded.time,"
                  " sent_uid=CASE WHEN excluded.sent_uid='' THEN sent_uid ELSE "
                  "excluded.sent_uid END, sent_class=CASE WHEN excluded.sent_class='' THEN "
                  "sent_class ELSE excluded.sent_class END",
                  (obj, destination, state, sent_uid, sent_class, reason, time.time()))

    def unconfirm(self, obj: str, destination: str | None) -> None:
        if destination is None:
            self._run("DELETE FROM confirmations WHERE obj=?", (obj,))
        else:
            self._run("DELETE FROM confirmations WHERE obj=? AND destination=?",
                      (obj, destination))

    def sop_of(self, obj: str) -> str | None:
        rows = self._run("SELECT sop FROM objects WHERE obj=?", (obj,))
        return str(rows[0][0]) if rows else None

    def outcomes(self, sop_uids: Sequence[str]) -> dict[str, list[Outcome]]:
        """SOP Instance UID -> the outcomes of the objects received with it."""
        found: dict[str, list[Outcome]] = {}
        for chunk in _chunks(list(dict.fromkeys(sop_uids)), 500):
            marks = ",".join("?" * len(chunk))
            rows = self._run(f"SELECT obj, sop, state, routed, reason FROM objects WHERE sop "  # noqa: S608 - only ? marks
                             f"IN ({marks})", chunk)
            objs = [r[0] for r in rows]
            confirmations: dict[str, dict[str, tuple[str, str]]] = {}
            for sub in _chunks(objs, 500):
                m = ",".join("?" * len(sub))
                for obj, dest, state, reason in self._run(
                        f"SELECT obj, destination, state, reason FROM confirmations WHERE obj "  # noqa: S608
                        f"IN ({m})", sub):
                    confirmations.setdefault(obj, {})[dest] = (state, reason)
            for obj, sop, state, routed, reason in rows:
                found.setdefault(sop, []).append(Outcome(
                    state, tuple(json.loads(routed)), reason, confirmations.get(obj, {})))
        return found

    # --- the relay's own requests to a PACS with commitment = true --------------------------

    def to_ask(self, destination: str, limit: int = 500) -> list[tuple[str, str, str]]:
        """(obj, class UID, instance UID as sent) delivered there, commitment not asked yet."""
        rows = self._run("SELECT obj, sent_class, sent_uid FROM confirmations WHERE "
                         "destination=? AND state='delivered' AND asked IS NULL AND sent_uid<>''"
                         " ORDER BY time LIMIT ?", (destination, limit))
        return [(r[0], r[1], r[2]) for r in rows]

    def asked(self, destination: str, objs: Sequence[str]) -> None:
        now = time.time()
        self._many(("UPDATE confirmations SET asked=? WHERE obj=? AND destination=?",
                    (now, obj, destination)) for obj in objs)

    def ask_again(self, destination: str, older_than: float) -> int:
        """Requests to the PACS left unanswered since `older_than`: asked again."""
        with self._lock:
            cur = self._db.execute("UPDATE confirmations SET asked=NULL WHERE destination=? "
                                   "AND state='delivered' AND asked < ?",
                                   (destination, older_than))
            return cur.rowcount

    def committed_by(self, destination: str, sent_uids: Sequence[str], state: str,
                     reason: str = "") -> int:
        """The PACS's report: its committed (or failed) instances, by the UIDs it got."""
        count = 0
        with self._lock:
            for uid in sent_uids:
                cur = self._db.execute(
                    "UPDATE confirmations SET state=?, reason=?, time=? WHERE destination=? "
                    "AND sent_uid=? AND state IN ('delivered', 'committed', 'failed')",
                    (state, reason, time.time(), destination, uid))
                count += cur.rowcount
        return count

    # --- transactions -------------------------------------------------------------------------

    def add_transaction(self, uid: str, requester: str, host: str, timeout: float,
                        instances: Sequence[tuple[str, str]], owner: int | None) -> None:
        now = time.time()
        self._run("INSERT OR REPLACE INTO transactions (uid, requester, host, created, "
                  "deadline, instances, owner) VALUES (?,?,?,?,?,?,?)",
                  (uid, requester, host, now, now + timeout, json.dumps(list(instances)),
                   owner))

    def transactions(self) -> list[Transaction]:
        rows = self._run("SELECT uid, requester, host, created, deadline, instances, owner, "
                         "attempts, next_try, last_error FROM transactions ORDER BY created")
        return [Transaction(r[0], r[1], r[2], r[3], r[4],
                            [(c, i) for c, i in json.loads(r[5])], r[6], r[7], r[8], r[9])
                for r in rows]

    def release_owner(self, uid: str) -> None:
        self._run("UPDATE transactions SET owner=NULL WHERE uid=?", (uid,))

    def retry_later(self, uid: str, attempts: int, next_try: float, error: str) -> None:
        self._run("UPDATE transactions SET attempts=?, next_try=?, last_error=? WHERE uid=?",
                  (attempts, next_try, error, uid))

    def reported(self, uid: str, committed: int, failed: int) -> None:
        self._many([("DELETE FROM transactions WHERE uid=?", (uid,)),
                    ("UPDATE totals SET committed = committed + ?, failed = failed + ?",
                     (committed, failed))])

    def figures(self) -> tuple[int, int, int]:
        """(transactions pending, instances reported committed, reported failed): for the
        metrics, whichever relay process sent the reports."""
        pending = self._run("SELECT count(*) FROM transactions")[0][0]
        committed, failed = self._run("SELECT committed, failed FROM totals")[0]
        return int(pending), int(committed), int(failed)

    def prune(self, older_than: float) -> None:
        """Outcomes older than any transaction may still ask about."""
        self._many([("DELETE FROM confirmations WHERE time < ? AND obj IN (SELECT obj FROM "
                     "objects WHERE time < ?)", (older_than, older_than)),
                    ("DELETE FROM objects WHERE time < ?", (older_than,))])


def _chunks(items: list[str], size: int) -> Iterable[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class LedgerWriter(Subscriber):
    """The event stream's subscriber that keeps the ledger (in the process that handles
    objects)."""

    def __init__(self, ledger: Ledger, spool: Spool) -> None:
        self.ledger = ledger
        self.spool = spool

    def handlers(self) -> list[tuple[type[Event], Any]]:
        return [(Received, self.on_received), (Routed, self.on_routed),
                (Unrouted, self.on_unrouted), (Failed, self.on_failed),
                (Delivered, self.on_delivered), (Requeued, self.on_requeued)]

    def on_received(self, e: Received) -> None:
        self.ledger.received(e.obj, e.identity.sop_instance_uid, e.identity.sop_class_uid)

    def on_routed(self, e: Routed) -> None:
        self.ledger.routed(e.obj, e.to)

    def on_unrouted(self, e: Unrouted) -> None:
        self.ledger.object_failed(e.obj, self._sop_of(e.obj, None, None), "unrouted", e.why_keys)

    def on_failed(self, e: Failed) -> None:
        if e.destination is None:
            sop = self._sop_of(e.obj, e.identity.sop_instance_uid if e.identity else None,
                               e.reason)
            self.ledger.object_failed(e.obj, sop, "failed", e.reason)
        else:
            self.ledger.confirmed(e.obj, e.destination, "failed", reason=e.reason)

    def on_delivered(self, e: Delivered) -> None:
        identity = e.identity
        self.ledger.confirmed(e.obj, e.destination, "delivered",
                              identity.sop_instance_uid if identity else "",
                              identity.sop_class_uid if identity else "")

    def on_requeued(self, e: Requeued) -> None:
        # Back in incoming/ (processed again: a new Received) or in one destination's queue.
        destination = e.to.removeprefix("out/") if e.to.startswith("out/") else None
        self.ledger.unconfirm(e.obj, destination)

    def _sop_of(self, obj: str, known: str | None, reason: str | None) -> str:
        """The SOP Instance UID of an object quarantined before it was read through: from its
        quarantined file's header."""
        if known:
            return known
        known = self.ledger.sop_of(obj)
        if known is not None:
            return known
        if reason:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = dcmread(self.spool.failed_folder(reason) / obj,
                                 stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                    return str(ds.get("SOPInstanceUID", "") or "")
                except Exception:  # noqa: BLE001 - not DICOM: no UID a request could name
                    return ""
        return ""

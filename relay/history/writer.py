"""The history's writer: a subscriber of the event stream that never slows the relay down.

Handlers only translate the event (rows.ops_of) and append to a list; a thread of its own
writes the list in batches, one transaction each. A database that is down or too slow never
blocks an object and loses no history: the batch goes to a backlog file in the spool
(JSON lines), written to the database, oldest first, once it answers again."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from relay.events import Event, Handler, Subscriber
from relay.history.rows import Op, ops_of
from relay.history.store import HistoryStore

log = logging.getLogger("relay.history")

# Operations kept in memory before they go to the backlog file.
MAX_PENDING = 200_000
PRUNE_EVERY = 3600.0


class HistoryWriter(Subscriber):
    def __init__(self, store: HistoryStore, backlog: Path, *, patient_values: bool = True,
                 keep_days: float = 90.0, interval: float = 0.5, batch_size: int = 5000,
                 retry: float = 5.0) -> None:
        self.store = store
        self.backlog = backlog
        self.patient_values = patient_values
        self.keep_days = keep_days
        self.interval = interval
        self.batch_size = batch_size
        self.retry = retry
        self._pending: list[Op] = []
        self._cond = threading.Condition()
        self._file_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down_since: float | None = None
        self._next_try = 0.0
        self._next_prune = 0.0
        self.written = 0  # operations the database took (for tests and the console)
        self._schema_ready = False  # upgraded on the first write (the database may be down)

    # --- the event stream ------------------------------------------------------------------

    def handlers(self) -> list[tuple[type[Any], Handler]]:
        return [(Event, self.take)]

    def ops(self, event: Event) -> list[Op]:
        return ops_of(event, self.patient_values)

    def take(self, event: Event) -> None:
        ops = self.ops(event)
        if not ops:
            return
        with self._cond:
            self._pending.extend(ops)
            if len(self._pending) > MAX_PENDING:
                # The database has not kept up for a long while: the file holds the rest.
                spill, self._pending = self._pending, []
                self._append(spill)
            elif len(self._pending) >= self.batch_size:
                self._cond.notify()

    # --- the thread --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="history", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is pending (or keep it in the backlog file), then end the thread."""
        self._stop.set()
        with self._cond:
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()
        self.store.close()

    def run(self) -> None:
        self._ensure_schema()
        while not self._stop.is_set():
            with self._cond:
                if len(self._pending) < self.batch_size:
                    self._cond.wait(self.interval)
            self.flush()
            self._maybe_prune()

    def flush(self) -> None:
        """Write what is pending: to the database, or to the backlog file while the
        database does not take it (or while older operations wait there)."""
        with self._cond:
            batch, self._pending = self._pending, []
        if self.backlog.exists():
            if batch:
                self._append(batch)
            self._drain()
            return
        if not batch:
            return
        if time.monotonic() < self._next_try:
            self._append(batch)
            return
        if not self._write(batch):
            self._append(batch)

    def _ensure_schema(self) -> bool:
        """Create or upgrade the tables once (the database may be down at start-up: then
        at the first write it takes)."""
        if self._schema_ready:
            return True
        try:
            self.store.upgrade()
        except (SQLAlchemyError, OSError) as exc:
            self._failed(exc)
            return False
        self._schema_ready = True
        return True

    def _write(self, ops: list[Op]) -> bool:
        if not self._ensure_schema():
            return False
        try:
            for i in range(0, len(ops), self.batch_size):
                self.store.apply(ops[i:i + self.batch_size])
        except (SQLAlchemyError, OSError) as exc:
            self._failed(exc)
            return False
        if self._down_since is not None:
            log.warning("history database %s answers again (after %.0f s): catching up",
                        self.store.engine.url.render_as_string(hide_password=True),
                        time.monotonic() - self._down_since)
            self._down_since = None
        self.written += len(ops)
        return True

    def _failed(self, exc: Exception) -> None:
        self._next_try = time.monotonic() + self.retry
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("history database %s does not take the history (%s): relaying goes "
                        "on; the history waits in %s and is written once it answers",
                        self.store.engine.url.render_as_string(hide_password=True),
                        str(exc).splitlines()[0][:300], self.backlog)

    def _append(self, ops: list[Op]) -> None:
        with self._file_lock:
            fd = os.open(self.backlog, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(op, ensure_ascii=False) + "\n" for op in ops)

    def _drain(self) -> None:
        """Write the backlog file to the database, oldest first; remove it once all went.
        A crash half-way writes some operations twice: a timeline line twice, no state
        wrong (states keep the latest time)."""
        if time.monotonic() < self._next_try:
            return
        with self._file_lock:
            try:
                with self.backlog.open(encoding="utf-8") as f:
                    lines = f.readlines()
            except FileNotFoundError:
                return
            ops: list[Op] = []
            for line in lines:
                try:
                    kind, row = json.loads(line)
                except ValueError:
                    continue  # a line cut by a crash while it was written
                ops.append((kind, row))
            if self._write(ops):
                self.backlog.unlink(missing_ok=True)

    def _maybe_prune(self) -> None:
        if (self.keep_days <= 0 or time.monotonic() < self._next_prune
                or not self._schema_ready):
            return
        self._next_prune = time.monotonic() + PRUNE_EVERY
        try:
            gone = self.store.prune(time.time() - self.keep_days * 86400)
        except (SQLAlchemyError, OSError) as exc:
            log.warning("history: cannot prune (%s)", str(exc).splitlines()[0][:300])
            return
        if gone:
            log.info("history: %d event(s) older than %g day(s) pruned", gone, self.keep_days)

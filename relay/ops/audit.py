"""The audit log: one JSON line per object and step, for whoever must answer "what happened to
this image": received, edited (rules applied, old -> new values), routed (where, and why not
elsewhere), released from a hold, transcoded, delivered where with which status, deferred,
failed why, requeued. `[audit].patient_values = false` leaves the values out.

A subscriber of the event stream (relay.events). Its lines are an interface (admins parse
them): names and fields stay as they are."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from relay.events import (
    Action,
    Change,
    CommitmentDeferred,
    CommitmentEvent,
    CommitmentReported,
    CommitmentRequested,
    Deferred,
    Delivered,
    Edited,
    Failed,
    Handler,
    Queried,
    Received,
    Released,
    Requeued,
    Retrieved,
    Routed,
    Subscriber,
    Transcoded,
    Unrouted,
)


def timestamp(t: float) -> str:
    """UTC, milliseconds: 2026-12-04T15:25:31.042Z."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class AuditLog(Subscriber):
    def __init__(self, path: Path | None, *, patient_values: bool = True) -> None:
        self.path = path
        self.patient_values = patient_values
        self._lock = threading.Lock()
        self._file: Any = None  # opened on first use, kept open (rotate with copytruncate)

    def record(self, step: str, obj: str, *, when: float | None = None, **fields: Any) -> None:
        if self.path is None:
            return
        entry = {"time": timestamp(time.time() if when is None else when), "step": step,
                 "object": obj}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self._file = self._open(self.path)
            self._file.write(line)
            self._file.flush()

    @staticmethod
    def _open(path: Path) -> Any:
        """Append, readable by the relay's user only, like the spool's objects: the log holds
        patient values. A log an older version created 0644 is narrowed to 0600."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def changes(self, changes: Iterable[Change]) -> list[dict[str, Any]]:
        """Rule results for the log: with old -> new values, or only the attribute names."""
        if self.patient_values:
            return [{"attribute": c.attribute, "before": c.before, "after": c.after}
                    for c in changes]
        return [{"attribute": c.attribute} for c in changes]

    # --- the event stream ------------------------------------------------------------------

    def handlers(self) -> list[tuple[type[Any], Handler]]:
        if self.path is None:
            return []
        return [(Received, self._received), (Edited, self._edited), (Routed, self._routed),
                (Unrouted, self._unrouted), (Failed, self._failed),
                (Released, self._released), (Transcoded, self._transcoded),
                (Delivered, self._delivered), (Deferred, self._deferred),
                (Requeued, self._requeued), (Action, self._action),
                (Queried, self._queried), (Retrieved, self._retrieved),
                (CommitmentRequested, self._commitment), (CommitmentReported, self._commitment),
                (CommitmentDeferred, self._commitment)]

    def _received(self, e: Received) -> None:
        self.record("received", e.obj, when=e.time, calling_ae=e.calling_ae, size=e.size,
                    arrived=round(e.arrived, 3), sop_instance_uid=e.identity.sop_instance_uid,
                    transfer_syntax=e.transfer_syntax)

    def _edited(self, e: Edited) -> None:
        if e.destination is None:  # a destination's own edits: in the history, not here
            self.record("edited", e.obj, when=e.time, changes=self.changes(e.changes),
                        rules_skipped=len(e.skipped) or None)
            return
        # ... but pixels blanked for a destination (a redact rule) are: what left the
        # relay with less in its image than it came with. Regions, never values.
        for change in e.changes:
            if change.attribute == "PixelData":
                self.record("redacted", e.obj, when=e.time, destination=e.destination,
                            done=change.after)

    def _routed(self, e: Routed) -> None:
        # Why not, with the value that decided it, unless the audit keeps no patient values
        # (then only the filter key that refused it).
        why_not = e.not_to if self.patient_values else e.refused_by
        self.record("routed", e.obj, when=e.time, to=list(e.to), not_to=dict(why_not) or None)

    def _unrouted(self, e: Unrouted) -> None:
        detail = e.why if self.patient_values else None
        if e.kept:
            self.record("failed", e.obj, when=e.time, stage="route", reason="unrouted",
                        detail=detail)
        else:
            self.record("deleted", e.obj, when=e.time, reason="unrouted", detail=detail)

    def _failed(self, e: Failed) -> None:
        shown = e.audited_detail and (self.patient_values or not e.sensitive)
        self.record("failed", e.obj, when=e.time, stage=e.stage, destination=e.destination,
                    kind=e.kind, status=e.status, http_status=e.http_status, reason=e.reason,
                    detail=e.detail if shown else None)

    def _released(self, e: Released) -> None:
        for obj in e.objects:
            self.record("released", obj, when=e.time, destination=e.destination, study=e.study)

    def _transcoded(self, e: Transcoded) -> None:
        self.record("transcoded", e.obj, when=e.time, destination=e.destination, kind=e.kind,
                    transfer_syntax=e.transfer_syntax, to=e.to, because=e.because)

    def _delivered(self, e: Delivered) -> None:
        self.record("delivered", e.obj, when=e.time, destination=e.destination, kind=e.kind,
                    status=e.status, http_status=e.http_status)

    def _deferred(self, e: Deferred) -> None:
        self.record("deferred", e.obj, when=e.time, destination=e.destination, kind=e.kind,
                    status=e.status, http_status=e.http_status, detail=e.detail)

    def _requeued(self, e: Requeued) -> None:
        self.record("requeued", e.obj, when=e.time, reason=e.reason, to=e.to, user=e.actor)

    def _action(self, e: Action) -> None:
        self.record("action", e.target, when=e.time, action=e.action, user=e.actor,
                    detail=e.detail or None)

    def _queried(self, e: Queried) -> None:
        self.record("query", e.requester, when=e.time, host=e.host, level=e.level,
                    keys=e.keys if self.patient_values else e.key_names, matches=e.matches,
                    status=e.status, detail=e.detail or None)

    def _retrieved(self, e: Retrieved) -> None:
        self.record("retrieve", e.requester, when=e.time, host=e.host, operation=e.operation,
                    move_destination=e.move_destination, level=e.level,
                    keys=e.keys if self.patient_values else e.key_names,
                    completed=e.completed, failed=e.failed, warning=e.warning,
                    status=e.status, detail=e.detail or None)

    def _commitment(self, e: CommitmentEvent) -> None:
        """A storage commitment transaction (object: its Transaction UID)."""
        fields: dict[str, Any] = {"requester": e.requester, "host": e.host,
                                  "instances": e.instances}
        if isinstance(e, CommitmentReported):
            step = "commitment-reported"
            fields.update(committed=e.committed, failed=e.failed, via=e.via,
                          failures=list(e.failures) or None)
        elif isinstance(e, CommitmentDeferred):
            step = "commitment-deferred"
            fields.update(detail=e.detail, retry_in=round(e.retry_in, 1))
        else:
            step = "commitment-requested"
        self.record(step, e.transaction, when=e.time, **fields)


NO_AUDIT = AuditLog(None)

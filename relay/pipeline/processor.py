"""The processor: claims an incoming object, applies the global rules, routes it, makes each
destination's copy and publishes them to the destinations' queues (out/<dest>/).

Each outcome is an event (relay.events), emitted here where it happens: received, edited,
routed or unrouted, failed, queued. What the audit, the metrics and the log make of them is
theirs (relay.ops).
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay.edit.dicomxml import AttributeChange
from relay.edit.editor import BadInput, Editor, EditOutcome
from relay.events import (
    WITHHELD,
    Change,
    Edited,
    EventBus,
    Failed,
    Identity,
    Queued,
    Received,
    Routed,
    Unrouted,
)
from relay.route.filters import Routing, only_to
from relay.route.router import Copies, Place, Router
from relay.send.sender import DestinationSender
from relay.spool import Failure, Spool

log = logging.getLogger("relay.pipeline")


class Committer:
    """Makes published objects durable in groups: one syncfs for every object published
    since the last one, then their originals leave work/. Until then a crash only repeats
    their edit (duplicates at worst); senders may already be sending them meanwhile."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pending: list[tuple[Path, Iterable[Path]]] = []
        self._cond = threading.Condition()
        self._stopping = False

    def add(self, claimed: Path, edited: Iterable[Path]) -> None:
        with self._cond:
            self._pending.append((claimed, edited))
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait(1.0)
                if not self._pending:
                    return  # stopping, everything committed
                group, self._pending = self._pending, []
            try:
                self.spool.commit(group)
            except OSError as exc:
                # The originals stay in work/: the next start-up publishes them again.
                log.error("cannot make %d published object(s) durable (%s): their originals "
                          "stay in work/ until the next start", len(group), exc.strerror or exc)

    def stop(self) -> None:
        """Commit what is pending, then let run() return."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()


@dataclass(frozen=True)
class Setup:
    """What a reload replaces, swapped as one: the rules, the routes, the senders."""

    editor: Editor
    router: Router
    senders: dict[str, DestinationSender] = field(default_factory=dict)
    unrouted: str = "keep"


@dataclass
class Plan:
    """What the rules and routes make of one object."""

    outcome: EditOutcome
    routing: Routing | None = None  # None: the edited object could not be read to route it
    route_error: str = ""
    copies: Copies = field(default_factory=Copies)


def plan(editor: Editor, router: Router, src: Path, edited: Path, place: Place, *,
         sync: bool = True, calling_ae: str | None = None) -> Plan:
    """Edit `src` into `edited` with the global rules, route the result and make each
    destination's copy (those with rules of their own: where `place` says). The one flow
    of the relay and of `dicom-relay edit`. Raises BadInput when the object cannot be
    relayed at all."""
    outcome = editor.edit(src, edited, sync=sync)
    try:
        routing = router.route(edited, calling_ae or outcome.source_ae)
    except (OSError, ValueError, TypeError) as exc:
        return Plan(outcome, route_error=f"routing: {exc}")
    result = Plan(outcome, routing)
    if routing.to:
        result.copies = router.copies(edited, routing.to, place, sync)
    return result


def _changes(changes: Sequence[AttributeChange]) -> tuple[Change, ...]:
    return tuple(Change(c.path, c.before, c.after) for c in changes)


def _top_level(changes: Sequence[AttributeChange]) -> dict[str, str | None]:
    return {c.path: c.after for c in changes if "." not in c.path and "[" not in c.path}


class Processor:
    """Claims incoming objects, applies the rules, routes them, publishes to the queues of
    the destinations they are routed to."""

    def __init__(self, spool: Spool, setup: Setup, events: EventBus | None = None,
                 committer: Committer | None = None, patient_values: bool = True) -> None:
        self.spool = spool
        # False ([audit].patient_values): sidecars say why without quoting patient values.
        self.patient_values = patient_values
        self.events = events if events is not None else EventBus()
        # None: every object is made durable on its own (fsync of file and folders).
        self.committer = committer
        self.setup = setup

    def process(self, path: Path) -> bool:
        """Handle one incoming object; False if another worker had already claimed it."""
        claimed = self.spool.claim(path)
        if claimed is None:
            return False
        # One object, one configuration: a reload meanwhile applies from the next object.
        setup = self.setup
        stat = claimed.stat()
        edited = self.spool.edited_path(claimed)
        durable = self.committer is None
        try:
            result = plan(setup.editor, setup.router, claimed, edited,
                          lambda _name, index: self.spool.edited_path(claimed, index),
                          sync=durable)
        except BadInput as exc:
            self._discard_edits(claimed)
            self._quarantine(claimed, Failed(obj=claimed.name, stage="process",
                                             reason=exc.reason, detail=exc.detail,
                                             sensitive=exc.sensitive))
            return True
        except OSError as exc:
            # Disk trouble is not the object's fault: its edits go, it goes back to
            # incoming/ to be processed again, never stuck in work/ until the next start.
            log.error("%s: cannot edit, route or queue it (%s): left in incoming/",
                      claimed.name, exc.strerror or exc)
            self._discard_edits(claimed)
            if claimed.exists():
                self.spool.claim_back(claimed)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the object
            log.exception("%s: unexpected error while editing", claimed.name)
            self._discard_edits(claimed)
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self._quarantine(claimed, Failed(obj=claimed.name, stage="process",
                                             reason="internal-error", detail=detail,
                                             audited_detail=False))
            return True
        try:
            self._publish(setup, claimed, edited, result, stat)
        except OSError as exc:
            # A full disk (a destination's copy, a link) is not the object's fault either.
            log.error("%s: cannot route or queue it (%s): left in incoming/", claimed.name,
                      exc.strerror or exc)
            self._discard_edits(claimed)
            if claimed.exists():
                self.spool.claim_back(claimed)
            raise
        return True

    def _discard_edits(self, claimed: Path) -> None:
        for leftover in self.spool.work.glob(f"{claimed.name}.edited*"):
            leftover.unlink(missing_ok=True)

    def _shown(self, detail: str, sensitive: bool) -> str:
        """A failure's detail as a sidecar may keep it."""
        if self.patient_values or not sensitive:
            return detail
        return WITHHELD

    def _quarantine(self, claimed: Path, failed: Failed) -> None:
        self.spool.fail(claimed, Failure(failed.reason,
                                         self._shown(failed.detail, failed.sensitive),
                                         failed.stage))
        self.events.emit(failed)

    def _publish(self, setup: Setup, claimed: Path, edited: Path, result: Plan,
                 stat: os.stat_result) -> None:
        outcome, name = result.outcome, claimed.name
        emit = self.events.emit
        emit(Received(obj=name, identity=outcome.identity, calling_ae=outcome.source_ae,
                      size=stat.st_size, arrived=stat.st_mtime,
                      transfer_syntax=outcome.transfer_syntax))
        emit(Edited(obj=name, changes=_changes(outcome.changes),
                    skipped=tuple(outcome.missing)))
        routing = result.routing
        only = self.spool.only_for(name)
        if routing is not None and only is not None:
            routing = only_to(routing, only)
            # Its copies were made for every destination its filters took: the others'
            # are dropped (they had theirs), and so is a failure of theirs.
            kept = {d: f for d, f in result.copies.files.items() if d in only}
            for dropped in set(result.copies.files.values()) - set(kept.values()) - {edited}:
                dropped.unlink(missing_ok=True)
            result.copies.files = kept
            result.copies.failed = {d: e for d, e in result.copies.failed.items() if d in only}
        if routing is None:
            edited.unlink(missing_ok=True)
            self._quarantine(claimed, Failed(obj=name, stage="route", reason="unreadable",
                                             detail=result.route_error, audited_detail=False))
            return
        emit(Routed(obj=name, to=routing.to, not_to=routing.not_to,
                    refused_by=routing.refused_by))
        if not routing.to:
            self._unrouted(claimed, edited, routing, setup.unrouted)
            self.spool.clear_only(name)
            return
        copies = result.copies
        for destination, exc in copies.failed.items():
            self._failed_for(claimed, destination, exc)
        if not copies.files:  # every destination's own edit failed: nothing left to send
            edited.unlink(missing_ok=True)
            claimed.unlink()
            self.spool.clear_only(name)
            return
        queued = self.spool.publish(claimed, copies.files, durable=self.committer is None)
        if self.committer is not None:
            self.committer.add(claimed, (edited, *set(copies.files.values())))
        else:
            edited.unlink(missing_ok=True)  # when every destination had its own edit
        self.spool.clear_only(name)
        sent = outcome.identity.changed(_top_level(outcome.changes))
        for destination, path_out in zip(copies.files, queued, strict=True):
            own = copies.changes.get(destination)
            if own is not None:
                emit(Edited(obj=name, changes=_changes(own), destination=destination))
            identity = sent.changed(_top_level(own)) if own else sent
            self._enqueue(destination, path_out, stat.st_mtime, identity)

    def _enqueue(self, destination: str, path: Path, received: float,
                 identity: Identity) -> None:
        self.events.emit(Queued(obj=path.name, destination=destination, identity=identity))
        # The sender of the moment: one a reload put in place of the one this object's
        # setup knew finds it in out/<dest>/ anyway.
        sender = self.setup.senders.get(destination)
        if sender is not None:
            sender.enqueue(path, received=received, identity=identity)
        else:
            log.warning("%s: queued for %s, which a reload just removed: it stays in "
                        "out/%s/", path.name, destination, destination)

    def _unrouted(self, claimed: Path, edited: Path, routing: Routing, unrouted: str) -> None:
        why = "; ".join(f"{d}: {w}" for d, w in routing.not_to.items()) or "no destinations"
        why_keys = "; ".join(f"{d}: refused by its filter's {k}"
                             for d, k in routing.refused_by.items()) or "no destinations"
        edited.unlink(missing_ok=True)
        if unrouted == "delete":
            claimed.unlink()
        else:
            self.spool.fail(claimed, Failure("unrouted", why if self.patient_values
                                             else why_keys, "route"))
        self.events.emit(Unrouted(obj=claimed.name, why=why, why_keys=why_keys,
                                  kept=unrouted != "delete"))

    def _failed_for(self, claimed: Path, destination: str, exc: BadInput) -> None:
        """A destination's own edit failed: that destination gets nothing, the others go on.
        The original is kept for it (`retry` processes it again, for every destination its
        filters pick: a duplicate for the others, which PACS drop by SOP Instance UID)."""
        keep = self.spool.kept_path(claimed)
        keep.unlink(missing_ok=True)
        os.link(claimed, keep)
        self.spool.fail(keep, Failure(exc.reason, self._shown(exc.detail, exc.sensitive),
                                      "route", destination))
        self.events.emit(Failed(obj=claimed.name, stage="route", reason=exc.reason,
                                detail=exc.detail, sensitive=exc.sensitive,
                                destination=destination, audited_detail=False))


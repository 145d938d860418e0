"""The sender: one worker per destination, batches over one association, result → spool move.

A file leaves out/<dest>/ only when the destination answered success (or a warning that means
stored). Retryable failures stay queued and come back after a capped exponential backoff;
permanent ones go to failed/<reason>/ with the status in the sidecar.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from relay.config.model import Destination, SenderConfig
from relay.events import (
    BatchSent,
    Deferred,
    Delivered,
    DestinationDown,
    EventBus,
    Failed,
    Held,
    Identity,
    Released,
    Transcoded,
)
from relay.send.hold import StudyHold, arrival, sent_identity, study_of
from relay.send.results import Outcome, SendResult, Transport, local_failures, reason_of
from relay.send.transcode import CannotDecode, decompress_in_place, is_compressed
from relay.spool import Failure, Spool

log = logging.getLogger("relay.send")

# An object on the wire each time the destination broke off this many associations is taken
# to be what breaks them: it is quarantined (failed/not-sendable/) instead of retried.
POISON_STRIKES = 3
# An association kept for the next batch is released after this long without one.
KEEP_OPEN = 1.0


def backoff_delay(attempt: int, initial: float, cap: float) -> float:
    """Capped exponential backoff: initial, 2×initial, 4×initial, … never above cap."""
    return min(cap, initial * 2.0 ** max(0, attempt - 1))


@dataclass
class SendStats:
    delivered: int = 0
    failed: int = 0
    retried: int = 0


class DestinationSender:
    """Owns out/<dest>/: learns of new files through `enqueue`, of old ones by one scan.
    What happens to each object is an event on `events`."""

    def __init__(self, spool: Spool, destination: Destination, transport: Transport,
                 config: SenderConfig, clock: Callable[[], float] = time.monotonic,
                 events: EventBus | None = None, wall: Callable[[], float] = time.time
                 ) -> None:
        self.spool = spool
        self.events = events if events is not None else EventBus()
        self.destination = destination
        self.transport = transport  # the engine (DIMSE) or the STOW-RS sender (DICOMweb)
        self.config = config
        self.clock = clock
        self.stats = SendStats()
        self._ready: deque[Path] = deque()
        self._ready_since: dict[Path, float] = {}  # when each ready file became ready
        self._known: set[Path] = set()
        # When each object arrived in the spool (wall clock), for the latency metric; a
        # backlog found at start-up counts from when it was queued (its file's time).
        self._received: dict[Path, float] = {}
        # What each object is, as this destination gets it (known when the processor queued
        # it; not read again from a backlog found at start-up).
        self._identity: dict[Path, Identity] = {}
        self.batch_wait = (config.batch_wait if config.batch_wait is not None
                           else transport.batch_wait)
        self._delayed: dict[Path, float] = {}  # path → when it may be sent again
        self._attempts: dict[Path, int] = {}
        self._strikes: dict[Path, int] = {}  # times the association broke with it in flight
        self._transcoded: set[Path] = set()  # decompressed for this destination already
        # Consecutive batches in which it got no response while others in the batch did (a
        # tool that skips an object it cannot send, without saying so in a way we read).
        self._unanswered: dict[Path, int] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._hold_until = 0.0  # whole destination backing off (it is down)
        self._down_attempts = 0
        # hold_until_stable: objects wait by study; their timers are wall-clock file times.
        self.wall = wall
        self.hold = (StudyHold(destination.hold_until_stable, destination.hold_max)
                     if destination.hold_until_stable > 0 else None)
        # Paused (the console, the API): the queue fills, nothing is sent. A mark in the
        # spool, so that a restart keeps it.
        self.paused = spool.is_paused(destination.name)

    def set_paused(self, paused: bool) -> None:
        self.spool.set_paused(self.destination.name, paused)
        with self._cond:
            self.paused = paused
            self._cond.notify_all()

    def release_now(self, study: str) -> int:
        """Send a held study at once (objects held; 0: none of that study here)."""
        if self.hold is None:
            return 0
        with self._cond:
            count = self.hold.release_now(study)
            self._cond.notify_all()
        return count

    def enqueue(self, path: Path, received: float | None = None,
                identity: Identity | None = None) -> None:
        held = None
        if self.hold is not None:
            try:
                held = (study_of(path), arrival(path))
            except FileNotFoundError:
                return  # gone meanwhile (sent by an earlier run's queue, or requeued)
        with self._cond:
            # Known: in the queue or in flight. Gone: delivered meanwhile (see _settle).
            if path in self._known or not os.path.lexists(path):
                return
            self._known.add(path)
            if received is not None:
                self._received[path] = received
            if identity is not None:
                self._identity[path] = identity
            if held is not None and self.hold is not None:
                self.hold.add(path, *held)
            else:
                self._ready.append(path)
                self._ready_since[path] = self.clock()
            self._cond.notify()
        if held is not None:
            self.events.emit(Held(obj=path.name, destination=self.destination.name,
                                  kind=self.destination.kind, identity=identity,
                                  study=held[0]))

    def held(self) -> list[tuple[str, int, float]]:
        """(StudyInstanceUID, objects, seconds since its last object) of each held study."""
        if self.hold is None:
            return []
        now = self.wall()
        with self._cond:
            return [(s.uid, len(s.paths), now - s.last) for s in self.hold.studies.values()]

    @property
    def down(self) -> bool:
        """Nothing got through at the last try: the whole queue waits (backing off)."""
        return self._hold_until > self.clock()

    def held_paths(self, study: str) -> list[Path]:
        if self.hold is None:
            return []
        with self._cond:
            held = self.hold.studies.get(study)
            return list(held.paths) if held is not None else []

    def load_backlog(self) -> int:
        """Queue what is already in out/<dest>/ (a restart, or files put there by hand)."""
        backlog = self.spool.queued(self.destination.name)
        for path in backlog:
            self.enqueue(path)
        return len(backlog)

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def pending(self) -> int:
        with self._cond:
            return len(self._known)

    def _next_batch(self, idle_limit: float | None = None) -> list[Path]:
        """Wait for work; return up to batch_size files that are due now ([] when stopping,
        or after idle_limit seconds without any)."""
        give_up = None if idle_limit is None else self.clock() + idle_limit
        with self._cond:
            while not self._stop.is_set():
                now = self.clock()
                if self.paused:
                    if give_up is not None and now >= give_up:
                        return []
                    self._cond.wait(timeout=1.0 if give_up is None
                                    else max(0.01, min(1.0, give_up - now)))
                    continue
                if self.hold is not None and now >= self._hold_until:
                    for study in self.hold.release(self.wall()):
                        self.events.emit(Released(
                            destination=self.destination.name, study=study.uid,
                            objects=tuple(p.name for p in study.paths),
                            quiet_for=self.wall() - study.last))
                        return study.paths  # the whole study, one association
                for path, due in list(self._delayed.items()):
                    if due <= now:
                        del self._delayed[path]
                        self._ready.append(path)
                        self._ready_since[path] = now
                full_at = self._ready_since.get(self._ready[0], now) + self.batch_wait \
                    if self._ready else now
                if (self._ready and now >= self._hold_until
                        and (len(self._ready) >= self.config.batch_size or now >= full_at)):
                    batch: list[Path] = []
                    while self._ready and len(batch) < self.config.batch_size:
                        path = self._ready.popleft()
                        self._ready_since.pop(path, None)
                        batch.append(path)
                    return batch
                if give_up is not None and now >= give_up:
                    return []
                waits = [due - now for due in self._delayed.values()]
                if self.hold is not None and (due_at := self.hold.next_due()) is not None:
                    waits.append(max(0.05, due_at - self.wall()))
                if self._ready:
                    waits.append(max(self._hold_until, full_at) - now)
                if give_up is not None:
                    waits.append(give_up - now)
                self._cond.wait(timeout=min(waits) if waits else 1.0)
            return []

    def run(self) -> None:
        kept = False
        try:
            while not self._stop.is_set():
                batch = self._next_batch(KEEP_OPEN if kept else None)
                if batch:
                    self.send_batch(batch, keep_open=True)
                    kept = True
                elif kept:
                    # Nothing more came for a while: end the association kept for the next
                    # batch (well before a PACS's own idle timeout would).
                    self.transport.release(self.destination)
                    kept = False
        finally:
            self.transport.release(self.destination)

    def send_batch(self, batch: list[Path], keep_open: bool = False) -> list[SendResult]:
        started = self.clock()
        results = []
        # Each confirmed file leaves the spool as its response arrives, not at the end of the
        # batch: a crash mid-batch then resends only what was not confirmed yet.
        missing = SendResult(Path(), Outcome.RETRY, None, "no result from the engine")
        again: list[Path] = []  # transcoded for this destination: sent again at once
        try:
            for result in self.transport.send(batch, self.destination,
                                           self.config.calling_ae_title, self.config.timeout,
                                           keep_open):
                if self._wants_transcoding(result):
                    failure = self._transcode(result)
                    if failure is None:
                        again.append(result.path)
                        continue
                    self._settle(failure, reason="cannot-decode")
                    results.append(failure)
                    continue
                self._settle(result)
                results.append(result)
        except Exception as exc:  # noqa: BLE001 - a bug or a broken tool must not end the
            # destination's sender (its queue would stall unseen): what is unanswered waits.
            log.exception("%s: the %s sender failed", self.destination.name,
                          self.transport.name)
            missing = local_failures([Path()], f"the {self.transport.name} sender failed: "
                                     f"{type(exc).__name__}: {exc}")[0]
        answered = {r.path for r in results} | set(again)
        # An adapter must answer for every file; one it forgot is retried, never dropped.
        results += [replace(missing, path=p) for p in batch if p not in answered]
        self._schedule_retries(results)
        if again:
            with self._cond:
                self._requeue_front(again)
                self._cond.notify()
        self.events.emit(BatchSent(destination=self.destination.name,
                                   delivered=sum(r.outcome is Outcome.DELIVERED for r in results),
                                   total=len(results), seconds=self.clock() - started,
                                   pending=self.pending()))
        return results

    def _wants_transcoding(self, r: SendResult) -> bool:
        """The destination refused this compressed object's transfer syntax, it may be sent
        decompressed (transcode = "on-refusal"), and it has not been already."""
        return (r.refused_syntax and self.destination.transcode == "on-refusal"
                and r.path not in self._transcoded and is_compressed(r.path))

    def _transcode(self, r: SendResult) -> SendResult | None:
        """Decompress this destination's copy; None when done (to be sent again), else the
        failure to quarantine (no decoder takes it)."""
        try:
            before, after = decompress_in_place(r.path)
        except CannotDecode as exc:
            return SendResult(r.path, Outcome.FAILED, None,
                              f"refused in its transfer syntax ({r.detail}) and {exc}")
        except OSError as exc:
            return SendResult(r.path, Outcome.FAILED, None, f"refused in its transfer syntax "
                              f"({r.detail}); cannot write its decompressed copy: {exc}")
        with self._cond:
            self._transcoded.add(r.path)
        self.events.emit(Transcoded(obj=r.path.name, destination=self.destination.name,
                                    kind=self.destination.kind,
                                    identity=self._identity.get(r.path),
                                    transfer_syntax=before, to=after, because=r.detail))
        return None

    def _settle(self, r: SendResult, reason: str | None = None) -> None:
        """A final answer for one file: delivered (delete it) or refused (quarantine it)."""
        identity = self._identity.get(r.path)
        if identity is None and self.destination.commitment and \
                r.outcome is Outcome.DELIVERED:
            # Queued by an earlier run: storage commitment asks this PACS by the UIDs its
            # copy carries (its own rules may have changed them), read while it is here.
            identity = sent_identity(r.path)
        if r.outcome is Outcome.DELIVERED:
            received = self._received.get(r.path)
            if received is None:
                try:
                    received = r.path.stat().st_mtime
                except FileNotFoundError:
                    received = None
            # Under the queue's lock: a copy published again under this name meanwhile (the
            # edit of an original a crash left in work/ is repeated at start-up, and lands
            # where the first edit's link was) is then either taken by `enqueue` after this
            # (sent again: a duplicate at worst) or removed here with the one delivered (the
            # same object). Without the lock it could land between the unlink and the
            # forget, be skipped by `enqueue` as already known, and wait unseen in out/
            # until the next restart.
            with self._cond:
                self.spool.delivered(r.path)
                self._forget(r.path)
            self.stats.delivered += 1
            self.events.emit(Delivered(
                obj=r.path.name, destination=self.destination.name, kind=self.destination.kind,
                identity=identity, status=r.status_text, http_status=r.http_status,
                latency=None if received is None else self.wall() - received))
        elif r.outcome is Outcome.FAILED:
            reason = reason or reason_of(r, "not-sendable")
            with self._cond:  # as for a delivery: no copy of this name left unseen
                try:
                    self.spool.fail(r.path, Failure(reason, f"{r.status_text}: {r.detail}",
                                                    "send", self.destination.name))
                except FileNotFoundError:
                    log.error("%s vanished before it could be quarantined", r.path)
                self._forget(r.path)
            self.stats.failed += 1
            self.events.emit(Failed(
                obj=r.path.name, stage="send", reason=reason, detail=r.detail, sensitive=False,
                destination=self.destination.name, kind=self.destination.kind,
                status=r.status_text, http_status=r.http_status, identity=identity))

    def _schedule_retries(self, results: list[SendResult]) -> None:
        retry = [r for r in results if r.outcome is Outcome.RETRY]
        if not retry:
            self._down_attempts = 0
            return
        suspects = [r for r in retry if r.in_flight]
        if suspects:
            # The destination was there and broke off while receiving one object. That object
            # goes aside (so the others are not held behind it); if it breaks the association
            # every time, it is quarantined rather than blocking the queue for ever.
            self._set_aside(suspects[0])
            # The ones queued behind it were never on the wire: straight back to the front,
            # not penalised with a backoff of their own.
            behind = [r.path for r in retry if r is not suspects[0]]
            with self._cond:
                self._requeue_front(behind)
                self._cond.notify()
            self._down_attempts = 0
            return
        any_answer = any(r.status is not None for r in results)
        self.stats.retried += len(retry)
        now = self.clock()
        down: DestinationDown | None = None
        deferred: list[Deferred] = []
        with self._cond:
            if not any_answer:
                # Nothing got through: the destination is down, or our own tool is broken.
                # Hold the whole queue.
                self._down_attempts += 1
                delay = backoff_delay(self._down_attempts, self.config.retry_initial,
                                      self.config.retry_max)
                # A server that said when to come back (HTTP 503/429 Retry-After) is heard.
                delay = max([delay, *(r.retry_after for r in retry if r.retry_after)])
                self._hold_until = now + delay
                down = DestinationDown(
                    destination=self.destination.name, queued=len(self._known),
                    sent=len(retry), detail=retry[0].detail,
                    local_failure=retry[0].local_failure, retry_in=delay,
                    http_statuses=tuple(r.http_status for r in retry if r.http_status))
                # Keep their order: put them back at the front.
                self._requeue_front([r.path for r in retry])
            else:
                self._down_attempts = 0
                # Our own tool's failure (a JVM that died between objects) says nothing of
                # the objects it never sent: they are not counted as unanswered.
                retry = [r for r in retry
                         if r.local_failure or not self._unanswered_too_often(r)]
                for r in retry:
                    attempt = self._attempts.get(r.path, 0) + 1
                    self._attempts[r.path] = attempt
                    delay = backoff_delay(attempt, self.config.retry_initial,
                                          self.config.retry_max)
                    self._delayed[r.path] = now + delay
                    deferred.append(self._deferred(r, reason_of(r, "no-response"), delay))
            self._cond.notify()
        # Told outside the lock: a slow consumer must not hold the queue.
        if down is not None:
            self.events.emit(down)
        self.events.emit_all(deferred)

    def _deferred(self, r: SendResult, reason: str, delay: float) -> Deferred:
        return Deferred(obj=r.path.name, destination=self.destination.name,
                        kind=self.destination.kind, identity=self._identity.get(r.path),
                        reason=reason, status=r.status_text, detail=r.detail, retry_in=delay,
                        http_status=r.http_status)

    def _unanswered_too_often(self, r: SendResult) -> bool:
        """Count a batch in which r got no response while others did; quarantine r once that
        happened POISON_STRIKES times in a row (called with the condition held)."""
        if r.status is not None:
            self._unanswered.pop(r.path, None)  # it was answered (a retryable status)
            return False
        count = self._unanswered.get(r.path, 0) + 1
        self._unanswered[r.path] = count
        if count < POISON_STRIKES:
            return False
        self.stats.retried -= 1  # it is not retried after all
        self._settle(replace(
            r, outcome=Outcome.FAILED,
            detail=f"no response in {count} consecutive attempts while other objects of the "
            f"same batches were answered ({r.detail})"), reason="not-sendable")
        return True

    def _requeue_front(self, paths: list[Path]) -> None:
        """Back at the front of the queue, in order, due at once (they waited already)."""
        self._ready.extendleft(reversed(paths))
        for path in paths:
            self._ready_since[path] = float("-inf")

    def _set_aside(self, r: SendResult) -> None:
        strikes = self._strikes.get(r.path, 0) + 1
        self._strikes[r.path] = strikes
        if strikes >= POISON_STRIKES:
            self._settle(replace(
                r, outcome=Outcome.FAILED,
                detail=f"the association broke {strikes} times while sending it ({r.detail})"),
                reason="breaks-association")
            return
        delay = backoff_delay(strikes, self.config.retry_initial, self.config.retry_max)
        with self._cond:
            self._delayed[r.path] = self.clock() + delay
            self._cond.notify()
        self.events.emit(self._deferred(r, "association-broke", delay))

    def _forget(self, path: Path) -> None:
        with self._cond:
            self._known.discard(path)
            self._received.pop(path, None)
            self._ready_since.pop(path, None)
            self._attempts.pop(path, None)
            self._delayed.pop(path, None)
            self._strikes.pop(path, None)
            self._unanswered.pop(path, None)
            self._transcoded.discard(path)
            self._identity.pop(path, None)

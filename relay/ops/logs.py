"""The log lines of what happens to objects: a subscriber of the event stream, so that a
line is written once per outcome, the same wherever the outcome came from. (What is not an
object's outcome, such as start-up, reloads or a receiver that died, is logged where it
happens.)"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.uid import UID

from relay.events import (
    WITHHELD,
    BatchSent,
    Deferred,
    DestinationDown,
    Edited,
    Failed,
    Handler,
    Released,
    Subscriber,
    Transcoded,
    Unrouted,
)

log = logging.getLogger("relay.pipeline")
send_log = logging.getLogger("relay.send")
SHOWN_LIMIT = 80


def shown(text: object, limit: int = SHOWN_LIMIT) -> str:
    """Peer text (an AE title, a UID, a value) as a log line may show it: as it is when it is
    short and printable, else escaped and cut (a newline in a UID must not forge a line)."""
    value = str(text)
    if value.isprintable() and len(value) <= limit:
        return value
    escaped = value.encode("unicode_escape").decode("ascii")
    return '"' + escaped[:limit] + ("…" if len(escaped) > limit else "") + '"'


class LogLines(Subscriber):
    def __init__(self, patient_values: bool = True) -> None:
        # False ([audit].patient_values): no value of an object in a log line.
        self.patient_values = patient_values

    def handlers(self) -> list[tuple[type[Any], Handler]]:
        return [(Edited, self._edited), (Failed, self._failed), (Unrouted, self._unrouted),
                (Released, self._released), (Transcoded, self._transcoded),
                (BatchSent, self._batch), (Deferred, self._deferred),
                (DestinationDown, self._down)]

    def _edited(self, e: Edited) -> None:
        if e.destination is not None:
            return  # a destination's own edits: shown by `edit --dry-run`, in the history
        for skipped in e.skipped:
            log.warning("%s: rule not applied, source missing (on_missing = keep): %s",
                        e.obj, skipped)
        for change in e.changes:
            log.info("%s: %s", e.obj, change if self.patient_values
                     else f"{change.attribute} changed")

    def _failed(self, e: Failed) -> None:
        detail = e.detail if self.patient_values or not e.sensitive else WITHHELD
        if e.stage == "send":
            send_log.error("%s: %s refused permanently (%s %s): quarantined", e.destination,
                           e.obj, e.status, detail)
        elif e.destination is not None:
            log.error("%s: %s's own rules failed (%s): quarantined for it in failed/%s/",
                      e.obj, e.destination, detail, e.reason)
        else:
            log.error("%s: %s: quarantined in failed/%s/", e.obj, detail, e.reason)

    def _unrouted(self, e: Unrouted) -> None:
        why = e.why if self.patient_values else e.why_keys
        if e.kept:
            log.warning("%s: no destination takes it (%s): kept in failed/unrouted/",
                        e.obj, why)
        else:
            log.info("%s: no destination takes it (%s): deleted ([process].unrouted = "
                     "\"delete\")", e.obj, why)

    @staticmethod
    def _released(e: Released) -> None:
        send_log.info("%s: study %s released: %d object(s), quiet for %.0f s", e.destination,
                      e.study, len(e.objects), e.quiet_for)

    @staticmethod
    def _transcoded(e: Transcoded) -> None:
        send_log.info("%s: %s refused in %s: sent decompressed (%s) instead", e.destination,
                      e.obj, UID(e.transfer_syntax).name, UID(e.to).name)

    @staticmethod
    def _batch(e: BatchSent) -> None:
        if e.delivered:
            send_log.info("%s: %d of %d delivered in %.2f s (%d still queued)", e.destination,
                          e.delivered, e.total, e.seconds, e.pending)

    @staticmethod
    def _deferred(e: Deferred) -> None:
        if e.reason == "association-broke":
            send_log.warning("%s: association broke while sending %s (%s): set aside for "
                             "%.1f s", e.destination, e.obj, e.detail, e.retry_in)
        else:
            send_log.warning("%s: %s not stored (%s %s): retry in %.1f s", e.destination,
                             e.obj, e.status, e.detail, e.retry_in)

    @staticmethod
    def _down(e: DestinationDown) -> None:
        if e.local_failure:
            send_log.error("%s: %s (not the destination's fault): %d queued, next try in "
                           "%.1f s", e.destination, e.detail, e.queued, e.retry_in)
        else:
            send_log.warning("%s unavailable (%s): %d queued, next try in %.1f s",
                             e.destination, e.detail, e.queued, e.retry_in)

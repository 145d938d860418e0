"""The event stream: every outcome of an object, as a typed event, emitted once where it
happens.

The pipeline does not report an outcome to each consumer by hand; it emits one event, and
the consumers subscribe: the audit log, the metrics, the log lines (relay.ops), and, built on
the same stream, the history and storage commitment. Modelled on pynetdicom's `evt`: one
class per kind of event, handlers bound per class, `emit` calls them in the emitting thread,
in the order they were bound. A handler that fails is logged and never stops the work (nor
the other handlers).

An object is named by its spool file name (`obj`), the same in incoming/, work/,
out/<dest>/ and failed/: consumers join an object's events on it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

log = logging.getLogger("relay.events")
# What a sidecar or a log line says instead of a detail that may quote patient values, where
# [audit].patient_values = false.
WITHHELD = "(the detail may quote patient values: left out, [audit].patient_values = false)"


@dataclass(frozen=True)
class Identity:
    """What identifies an object and its study, as one copy of it says (a destination's
    own rules may change some of it: de-identification changes them all)."""

    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    modality: str = ""

    def changed(self, values: Mapping[str, str | None]) -> Identity:
        """This identity with the values a rule changed (keyword -> new value; None:
        removed)."""
        updates = {name: values[keyword] or "" for name, keyword in IDENTITY_KEYWORDS.items()
                   if keyword in values}
        return replace(self, **updates) if updates else self


# Identity field -> DICOM keyword.
IDENTITY_KEYWORDS = {
    "sop_instance_uid": "SOPInstanceUID",
    "sop_class_uid": "SOPClassUID",
    "study_instance_uid": "StudyInstanceUID",
    "series_instance_uid": "SeriesInstanceUID",
    "patient_id": "PatientID",
    "patient_name": "PatientName",
    "accession_number": "AccessionNumber",
    "modality": "Modality",
}


def _now() -> float:
    return time.time()


@dataclass(frozen=True, kw_only=True)
class Event:
    """Something that happened, and when (wall clock, seconds)."""

    time: float = field(default_factory=_now)


@dataclass(frozen=True, kw_only=True)
class ObjectEvent(Event):
    obj: str  # the object's spool file name


@dataclass(frozen=True)
class Change:
    """One attribute a rule changed (old -> new; None: absent)."""

    attribute: str  # e.g. "PatientID" or "OtherPatientIDsSequence[1].PatientID"
    before: str | None
    after: str | None

    def __str__(self) -> str:
        def show(v: str | None) -> str:
            return "(absent)" if v is None else repr(v)

        return f"{self.attribute}: {show(self.before)} -> {show(self.after)}"


# --- processing -----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Received(ObjectEvent):
    """An object the receiver stored was read and edited: it is in the relay's hands."""

    identity: Identity
    calling_ae: str | None  # (0002,0016), as the receivers record it
    size: int
    arrived: float  # when it was stored in the spool (its file's time)
    transfer_syntax: str


@dataclass(frozen=True, kw_only=True)
class Edited(ObjectEvent):
    """Rules applied: the global ones (destination None) or a destination's own."""

    changes: tuple[Change, ...]
    skipped: tuple[str, ...] = ()  # rules not applied: their source was missing (kept)
    destination: str | None = None


@dataclass(frozen=True, kw_only=True)
class Routed(ObjectEvent):
    """Where it goes; for the other destinations why not (with the value that decided it)
    and which filter key refused it."""

    to: tuple[str, ...]
    not_to: Mapping[str, str]
    refused_by: Mapping[str, str]


@dataclass(frozen=True, kw_only=True)
class Unrouted(ObjectEvent):
    """No destination's filter takes it: kept in failed/unrouted/, or deleted."""

    why: str  # each destination's filter key and the value that refused it
    why_keys: str  # the same without the values (for [audit].patient_values = false)
    kept: bool


@dataclass(frozen=True, kw_only=True)
class Failed(ObjectEvent):
    """Quarantined in failed/<reason>/ (before routing: destination None)."""

    stage: str  # process | route | send
    reason: str
    detail: str = ""
    # The detail may quote patient values (a rule's value, a filter's): left out where
    # [audit].patient_values is false.
    sensitive: bool = True
    # Whether the audit line carries the detail: the lines of internal errors and of
    # routing failures never did, and admins parse these lines as they are.
    audited_detail: bool = True
    destination: str | None = None
    kind: str | None = None  # dimse | dicomweb
    status: str | None = None  # "0xA900", "HTTP 409", "no response"
    http_status: int | None = None
    identity: Identity | None = None


# --- sending --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DestinationEvent(ObjectEvent):
    destination: str
    kind: str = "dimse"
    identity: Identity | None = None  # of the copy this destination gets, when known


@dataclass(frozen=True, kw_only=True)
class Queued(DestinationEvent):
    """Published to out/<destination>/ for sending."""


@dataclass(frozen=True, kw_only=True)
class Held(DestinationEvent):
    """Waiting in its destination's queue for its study to be complete."""

    study: str


@dataclass(frozen=True, kw_only=True)
class Released(Event):
    """A held study goes: all its objects, over one association."""

    destination: str
    study: str
    objects: tuple[str, ...]
    quiet_for: float  # seconds since its last object arrived


@dataclass(frozen=True, kw_only=True)
class Transcoded(DestinationEvent):
    """Its destination refused its transfer syntax: decompressed for that destination."""

    transfer_syntax: str
    to: str
    because: str


@dataclass(frozen=True, kw_only=True)
class Delivered(DestinationEvent):
    """The destination confirmed it (C-STORE success, a warning that means stored, STOW-RS
    success): its copy left the spool."""

    status: str
    http_status: int | None = None
    latency: float | None = None  # seconds from its arrival in the spool


@dataclass(frozen=True, kw_only=True)
class Deferred(DestinationEvent):
    """Not stored this time; it stays queued and is sent again after `retry_in` seconds."""

    reason: str  # status-A700, http-503, no-response, association-broke, …
    status: str
    detail: str
    retry_in: float
    http_status: int | None = None


@dataclass(frozen=True, kw_only=True)
class DestinationDown(Event):
    """Nothing got through to a destination (down, or our own tool failed): its whole
    queue waits `retry_in` seconds."""

    destination: str
    queued: int
    sent: int  # objects of the batch that failed
    detail: str
    local_failure: bool
    retry_in: float
    http_statuses: tuple[int, ...] = ()


@dataclass(frozen=True, kw_only=True)
class BatchSent(Event):
    """A batch to one destination is over (a summary, for the log)."""

    destination: str
    delivered: int
    total: int
    seconds: float
    pending: int


@dataclass(frozen=True, kw_only=True)
class Requeued(ObjectEvent):
    """Taken out of failed/ and queued again (`dicom-relay retry`, the console)."""

    reason: str  # the failed/ folder it came from
    to: str  # incoming (processed again) or out/<destination>
    actor: str | None = None  # the console user or API token that asked (None: the CLI)


@dataclass(frozen=True, kw_only=True)
class Action(Event):
    """Someone acted through the console or the API (pause, resume, release, delete,
    reload, resend): on record with their name."""

    actor: str
    action: str
    target: str
    detail: str = ""


# --- the proxy's other services (relay.services) -------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServiceEvent(Event):
    """A DICOM service the relay answered for a peer, passing it on to the PACS."""

    requester: str  # the peer's calling AE title
    host: str  # the peer's address
    level: str  # QueryRetrieveLevel (PATIENT, STUDY, SERIES, IMAGE; WORKLIST for MWL)
    keys: str  # the request's identifier: Keyword=value, … (may quote patient values)
    key_names: str  # the same without the values ([audit].patient_values = false)
    status: str  # the final status given to the peer: "0x0000", "0xFE00", "0xA801", …
    detail: str = ""  # why, where it is not success


@dataclass(frozen=True, kw_only=True)
class Queried(ServiceEvent):
    """A C-FIND answered through the relay: the PACS's matches passed on."""

    matches: int


@dataclass(frozen=True, kw_only=True)
class Retrieved(ServiceEvent):
    """A C-GET or C-MOVE served through the relay: objects fetched from the PACS and stored
    to the requester (C-GET) or to a [[modalities]] entry (C-MOVE)."""

    operation: str  # C-GET | C-MOVE
    move_destination: str | None
    completed: int
    failed: int
    warning: int


@dataclass(frozen=True, kw_only=True)
class CommitmentEvent(Event):
    """Storage commitment (relay.services.commitment): a modality's transaction."""

    transaction: str  # the modality's Transaction UID
    requester: str  # its calling AE title
    host: str
    instances: int


@dataclass(frozen=True, kw_only=True)
class CommitmentRequested(CommitmentEvent):
    """An N-ACTION (Request Storage Commitment) was taken and kept: answered with success."""


@dataclass(frozen=True, kw_only=True)
class CommitmentReported(CommitmentEvent):
    """Its N-EVENT-REPORT was sent and answered: the transaction is over."""

    committed: int
    failed: int
    via: str  # "the request's association" or "a new association to AE@host:port"
    failures: tuple[str, ...] = ()  # "UID: reason" of each failed instance


@dataclass(frozen=True, kw_only=True)
class CommitmentDeferred(CommitmentEvent):
    """Its report is due and could not be delivered (the modality unreachable): tried again
    after `retry_in` seconds."""

    detail: str
    retry_in: float


# --- the relay itself -----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Reloaded(Event):
    """A reload (SIGHUP) was applied, or refused (the running configuration stays)."""

    applied: bool
    detail: str = ""


E = TypeVar("E", bound=Event)
Handler = Callable[[Any], None]


class EventBus:
    """Handlers bound per event class (a handler bound to a base class gets its subclasses
    too); `emit` calls them in the emitting thread."""

    def __init__(self) -> None:
        self._handlers: list[tuple[type[Event], Handler]] = []
        self._lock = threading.Lock()
        self._by_type: dict[type[Event], tuple[Handler, ...]] = {}

    def bind(self, event_type: type[E], handler: Callable[[E], None]) -> None:
        with self._lock:
            self._handlers.append((event_type, handler))
            self._by_type = {}

    def unbind(self, handler: Handler) -> None:
        with self._lock:
            self._handlers = [(t, h) for t, h in self._handlers if h != handler]
            self._by_type = {}

    def subscribe(self, subscriber: Subscriber) -> None:
        """Bind every handler a subscriber declares (its `handlers()`)."""
        for event_type, handler in subscriber.handlers():
            self.bind(event_type, handler)

    def _handlers_of(self, event_type: type[Event]) -> tuple[Handler, ...]:
        handlers = self._by_type.get(event_type)
        if handlers is None:
            with self._lock:
                handlers = tuple(h for t, h in self._handlers if issubclass(event_type, t))
                self._by_type[event_type] = handlers
        return handlers

    def emit(self, event: Event) -> None:
        for handler in self._handlers_of(type(event)):
            try:
                handler(event)
            except Exception:  # noqa: BLE001 - a consumer's bug must never stop the work
                log.exception("a handler of %s failed (%r); the relay goes on",
                              type(event).__name__, handler)

    def emit_all(self, events: Sequence[Event]) -> None:
        for event in events:
            self.emit(event)


class Subscriber:
    """A consumer of the stream: says which handler takes which event class."""

    def handlers(self) -> list[tuple[type[Event], Handler]]:
        raise NotImplementedError

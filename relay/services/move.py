"""C-MOVE served by the relay itself, not by pynetdicom's Q/R service class: what a Fetch
brings from the PACS goes to the move destination through the engine's own sender (dcmsend,
dcm4che's JVM, pynetdicom), in batches of whatever has arrived, and the requester gets
pending responses with the counts as they change.

Why: pynetdicom's C-MOVE SCP stores each object itself, one pynetdicom C-STORE at a time
(with the C-GET from the PACS, ~4.6 ms of Python per object: bench/query.py); a toolkit
sends them for a fraction of that, and with the toolkit's own C-GET SCU (DCMTK's getscu,
dcm4che's in its JVM) no object passes through Python at all. pynetdicom picks a service
class by SOP class; the subclass below is the one it gets for the Q/R models, and serves a
C-MOVE itself only on an AE that carries SERVE_MOVE (the relay's services SCP): elsewhere it
is pynetdicom's own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

import pynetdicom.association
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import encode
from pynetdicom.service_class import QueryRetrieveServiceClass

from relay.send.results import Outcome
from relay.services.find import CANCEL, PENDING
from relay.services.retrieve import (
    SUCCESS,
    UNABLE_SUB_OPERATIONS,
    WARNING_SOME_FAILED,
    Fetch,
    ToolkitEngine,
)

if TYPE_CHECKING:
    from pynetdicom.presentation import PresentationContext

    from relay.config.model import Destination

log = logging.getLogger("relay.services")

SERVE_MOVE = "relay_serve_move"  # an AE attribute: its C-MOVEs are served by this callable
MOVE_DESTINATION_UNKNOWN = 0xA801  # also: the destination could not be reached (pynetdicom's)
HANDLER_FAILED = 0xC511
# Pending responses (optional, PS3.4 C.4.2.1.5) go at most this often: one per object cost
# as much Python as the rest of a toolkit-served move.
REPORT_EVERY = 0.05


@dataclass(frozen=True)
class MoveProgress:
    """One C-MOVE response to send: a pending one (counts) or the final one."""

    status: int
    remaining: int = 0
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: tuple[str, ...] | None = None  # the final response's identifier
    comment: str = ""  # ErrorComment of a failure

    @property
    def pending(self) -> bool:
        return self.status in PENDING


def move_response(request: C_MOVE, progress: MoveProgress, is_implicit: bool,
                  is_little: bool, is_deflated: bool) -> C_MOVE:
    rsp = C_MOVE()
    rsp.MessageID = request.MessageID
    rsp.MessageIDBeingRespondedTo = request.MessageID
    rsp.AffectedSOPClassUID = request.AffectedSOPClassUID
    rsp.Status = progress.status
    # Counts go in pending responses and in final ones that report sub-operations (success,
    # warning, cancel, A702); not with A801 or a failure in the Cxxx range.
    cancel = progress.status == CANCEL
    if progress.pending or cancel:
        rsp.NumberOfRemainingSuboperations = progress.remaining
    if progress.pending or cancel or progress.status in (SUCCESS, WARNING_SOME_FAILED,
                                                         UNABLE_SUB_OPERATIONS):
        rsp.NumberOfCompletedSuboperations = progress.completed
        rsp.NumberOfFailedSuboperations = progress.failed
        rsp.NumberOfWarningSuboperations = progress.warning
    if progress.failed_uids is not None:
        identifier = Dataset()
        identifier.FailedSOPInstanceUIDList = [u for u in progress.failed_uids if u]
        rsp.Identifier = BytesIO(cast(bytes, encode(identifier, is_implicit, is_little,
                                                    is_deflated)))
    if progress.comment and progress.status >= 0xA000 and not progress.pending:
        rsp.ErrorComment = progress.comment[:64]
    return rsp


class RelayQueryRetrieveServiceClass(QueryRetrieveServiceClass):  # type: ignore[misc]
    """pynetdicom's Q/R service class, but a C-MOVE on an AE carrying SERVE_MOVE is served by
    it: every response the callable yields is sent as it comes."""

    def _move_scp(self, req: C_MOVE, context: PresentationContext) -> None:
        serve: Callable[[evt.Event], Iterator[MoveProgress]] | None = getattr(
            self.ae, SERVE_MOVE, None)
        if serve is None:
            super()._move_scp(req, context)
            return
        cx_id = cast(int, context.context_id)
        syntax = context.transfer_syntax[0]
        encoding = (syntax.is_implicit_VR, syntax.is_little_endian, syntax.is_deflated)
        event = evt.Event(self.assoc, evt.EVT_C_MOVE, {
            "request": req, "context": context.as_tuple, "_is_cancelled": self.is_cancelled})
        final_sent = False
        try:
            for progress in serve(event):
                if not self.assoc.is_established:
                    return
                self.dimse.send_msg(move_response(req, progress, *encoding), cx_id)
                final_sent = not progress.pending
        except Exception as exc:
            log.exception("C-MOVE: the relay failed to serve it")
            if not final_sent and self.assoc.is_established:
                failure = MoveProgress(HANDLER_FAILED, comment=f"relay failure: {exc}")
                self.dimse.send_msg(move_response(req, failure, *encoding), cx_id)


# Where pynetdicom looks its service class up (3.0; 2.x alike). A pynetdicom without it
# keeps its own C-MOVE (pynetdicom then stores each object: slower, as correct).
_uid_to_service_class = getattr(pynetdicom.association, "uid_to_service_class", None)


def _service_class(uid: str) -> Any:
    assert _uid_to_service_class is not None
    found = _uid_to_service_class(uid)
    return RelayQueryRetrieveServiceClass if found is QueryRetrieveServiceClass else found


if _uid_to_service_class is not None:
    pynetdicom.association.uid_to_service_class = _service_class


def forward_objects(fetch: Fetch, total: int, engine: ToolkitEngine, target: Destination,
                    calling_ae: str, timeout: float, cancelled: Callable[[], bool]
                    ) -> Iterator[MoveProgress]:
    """Store what the fetch brings to `target` by the engine's sender, pending responses as
    results come (at most every REPORT_EVERY seconds), then the final one. Each object
    leaves its folder once answered. A batch the destination took none of, unreachable, ends
    the move (the PACS is told to stop): the rest would only wait on it in turn."""
    remaining, completed, failed, warning = total, 0, 0, 0
    failed_uids: list[str] = []
    reported = 0.0
    while remaining > 0:
        if cancelled():
            fetch.cancel()
            yield MoveProgress(CANCEL, remaining, completed, failed, warning,
                               tuple(failed_uids))
            return
        batch = fetch.arrived(0.1)
        if not batch:
            if fetch.finished:
                break
            continue
        unreachable = ""
        delivered = 0
        # An association per batch (a few per move): none is left open to the move
        # destination, whichever way the move ends.
        # confirm_each off: a relay killed mid-move never sends these again (its retrieve
        # folders go at start-up), so results at the end of each batch do.
        for result in engine.send(batch, target, calling_ae, timeout, confirm_each=False):
            remaining = max(0, remaining - 1)
            if result.outcome is Outcome.DELIVERED:
                delivered += 1
                if result.status:
                    warning += 1
                else:
                    completed += 1
            else:
                failed += 1
                failed_uids.append(fetch.uids.get(result.path, ""))
                if result.outcome is Outcome.RETRY:
                    unreachable = result.detail
            result.path.unlink(missing_ok=True)
            now = time.monotonic()
            if now - reported >= REPORT_EVERY:  # asking pynetdicom per object cost too
                if cancelled():
                    break  # the rest of the batch stays remaining (its sender stops)
                reported = now
                yield MoveProgress(PENDING[0], remaining, completed, failed, warning)
        if unreachable and not delivered:
            fetch.cancel()
            log.error("C-MOVE to %s stopped: %s", target.ae_title, unreachable)
            if not completed + warning:
                yield MoveProgress(MOVE_DESTINATION_UNKNOWN,
                                   comment=f"cannot store to {target.ae_title}")
                return
            break
    failed += remaining  # announced by the PACS, never brought (or never sent)
    failed_uids += fetch.failed_uids
    if failed or warning:
        yield MoveProgress(WARNING_SOME_FAILED if completed + warning else UNABLE_SUB_OPERATIONS,
                           0, completed, failed, warning, tuple(failed_uids),
                           comment=fetch.error)
        return
    yield MoveProgress(SUCCESS, 0, completed, 0, 0)

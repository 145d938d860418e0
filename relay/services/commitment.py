"""Storage Commitment Push Model through the relay ([commitment]): a modality frees its copy
only once the PACS has it.

The SCP side (a modality asks): an N-ACTION-RQ is kept in the ledger (relay.services.ledger)
and answered with success at once; the report (N-EVENT-REPORT) follows when every instance is
settled (`verdict`), or at [commitment].timeout with what is known: on the request's own
association if the modality still holds it open, else on a new association to its
[[modalities]] entry, tried again with backoff while it cannot be reached. A transaction
survives kill -9 and restarts (it is in the ledger before the success is sent).

The SCU side (a destination with `commitment = true`): what was delivered there is asked of
that PACS in turn; its N-EVENT-REPORT (on a new association to the relay's AE title, as
Orthanc and dcm4chee-arc send it, or on the request's) marks its instances committed.

Which process does what: every process with a commitment SCP keeps the transactions whose
association it holds (the embedded receiver's child on [receiver].port too); the process that
handles objects (`run`, `process`) writes the outcomes, asks the PACS, and sends the reports
that need a new association.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from io import BytesIO
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_context, build_role, evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import encode
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from relay.events import (
    CommitmentDeferred,
    CommitmentReported,
    CommitmentRequested,
    EventBus,
)
from relay.ops.logs import shown
from relay.send.sender import backoff_delay
from relay.services.ledger import Instance, Ledger, Transaction, verdict
from relay.services.retrieve import pid_alive
from relay.toolkits.associations import set_nodelay
from relay.toolkits.tls import client_context

if TYPE_CHECKING:
    from relay.config.model import Config, Destination, Modality

log = logging.getLogger("relay.commitment")

REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT Event Type ID
N_ACTION_RSP = 0x8130  # Command Field
NO_SUCH_ACTION_TYPE = 0x0123
MISSING_ATTRIBUTE = 0x0120
PROCESSING_FAILURE = 0x0110
TICK = 0.5  # seconds between looks at the pending transactions
ASK_AGAIN_AFTER = 120.0  # a PACS that did not report on a request is asked again
PRUNE_EVERY = 3600.0


def report_dataset(uid: str, verdicts: Sequence[Instance]) -> tuple[int, Dataset]:
    """The N-EVENT-REPORT's Event Type ID and Event Information for settled verdicts."""
    ds = Dataset()
    ds.TransactionUID = uid
    committed, failed = [], []
    for v in verdicts:
        item = Dataset()
        item.ReferencedSOPClassUID = v.sop_class
        item.ReferencedSOPInstanceUID = v.sop_instance
        if v.state == "committed":
            committed.append(item)
        else:
            item.FailureReason = v.reason
            failed.append(item)
    if committed:
        ds.ReferencedSOPSequence = committed
    if failed:
        ds.FailedSOPSequence = failed
    return (SOME_FAILED if failed else ALL_COMMITTED), ds


def referenced(ds: Dataset | None) -> list[tuple[str, str]] | None:
    """(class UID, instance UID) of a Referenced SOP Sequence; None when malformed."""
    if ds is None or "ReferencedSOPSequence" not in ds:
        return None
    items = []
    for item in ds.ReferencedSOPSequence:
        cls = str(item.get("ReferencedSOPClassUID", "") or "").strip()
        inst = str(item.get("ReferencedSOPInstanceUID", "") or "").strip()
        if not cls or not inst:
            return None
        items.append((cls, inst))
    return items


class StorageCommitment:
    """The service: handlers to bind on an SCP, and the worker that settles transactions."""

    def __init__(self, config: Config, ledger: Ledger, events: EventBus, *,
                 handles_objects: bool) -> None:
        assert config.commitment is not None
        self.config = config
        self.ledger = ledger
        self.events = events
        self.handles_objects = handles_objects
        self.timeout = config.commitment.timeout
        self.committing = frozenset(d.name for d in config.destinations if d.commitment)
        self._lock = threading.Lock()
        self._answering: dict[tuple[int, int], str] = {}  # (assoc, msg id) -> transaction
        self._live: dict[str, Any] = {}  # transaction -> the association it came on
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_prune = 0.0

    # --- what an SCP binds -------------------------------------------------------------------

    @staticmethod
    def add_contexts(ae: AE) -> None:
        # Both roles: a modality's request (we are SCP), a PACS's report on an association it
        # opens to us with role selection (we are SCU of the class, it SCP).
        ae.add_supported_context(StorageCommitmentPushModel, ALL_TRANSFER_SYNTAXES,
                                 scu_role=True, scp_role=True)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_N_ACTION, self.on_action), (evt.EVT_N_EVENT_REPORT, self.on_report),
                (evt.EVT_DIMSE_SENT, self.on_sent), (evt.EVT_CONN_CLOSE, self.on_close)]

    def on_action(self, event: evt.Event) -> tuple[int, Dataset | None]:
        requestor = event.assoc.requestor
        requester = requestor.ae_title.strip()
        if event.action_type != REQUEST_COMMITMENT:
            log.warning("N-ACTION from %s: action type %s is not Request Storage Commitment",
                        shown(requester), event.action_type)
            return NO_SUCH_ACTION_TYPE, None
        try:
            info = event.action_information
        except Exception as exc:  # noqa: BLE001 - undecodable: refused, the relay goes on
            log.warning("N-ACTION from %s: cannot decode it (%s)", shown(requester), exc)
            return PROCESSING_FAILURE, None
        uid = str(info.get("TransactionUID", "") or "").strip()
        instances = referenced(info)
        if not uid or not instances:
            log.warning("N-ACTION from %s without a Transaction UID or a complete Referenced "
                        "SOP Sequence: refused", shown(requester))
            return MISSING_ATTRIBUTE, None
        # Kept before the success goes out: a kill after it still finds the transaction.
        self.ledger.add_transaction(uid, requester, str(requestor.address), self.timeout,
                                    instances, os.getpid())
        with self._lock:
            self._answering[(id(event.assoc), int(event.request.MessageID))] = uid
        log.info("storage commitment asked by %s: transaction %s, %d instance(s)",
                 shown(requester), uid, len(instances))
        self.events.emit(CommitmentRequested(transaction=uid, requester=requester,
                                             host=str(requestor.address),
                                             instances=len(instances)))
        return 0x0000, None

    def on_sent(self, event: evt.Event) -> None:
        """The N-ACTION-RSP is out: from now on the report may go on that association."""
        command = getattr(event.message, "command_set", None)
        if command is None or int(command.get("CommandField", 0) or 0) != N_ACTION_RSP:
            return
        key = (id(event.assoc), int(command.get("MessageIDBeingRespondedTo", 0) or 0))
        with self._lock:
            uid = self._answering.pop(key, None)
            if uid is not None:
                self._live[uid] = event.assoc

    def on_close(self, event: evt.Event) -> None:
        with self._lock:
            gone = [uid for uid, assoc in self._live.items() if assoc is event.assoc]
            for uid in gone:
                del self._live[uid]
            for key in [k for k in self._answering if k[0] == id(event.assoc)]:
                gone.append(self._answering.pop(key))
        for uid in gone:  # its report goes on a new association (the objects' process)
            self.ledger.release_owner(uid)

    def on_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """A PACS's report on what the relay asked it to commit (commitment = true)."""
        caller = event.assoc.requestor.ae_title.strip() if event.assoc.is_acceptor else \
            event.assoc.acceptor.ae_title.strip()
        dest = next((d for d in self.config.destinations
                     if d.commitment and d.ae_title == caller), None)
        if dest is None:
            log.warning("N-EVENT-REPORT from %s: not a destination with commitment = true",
                        shown(caller))
            return PROCESSING_FAILURE, None
        try:
            info = event.event_information
        except Exception as exc:  # noqa: BLE001
            log.warning("N-EVENT-REPORT from %s: cannot decode it (%s)", dest.name, exc)
            return PROCESSING_FAILURE, None
        committed = [i for _, i in referenced(info) or []]
        failed = []
        for item in info.get("FailedSOPSequence", []) or []:
            uid = str(item.get("ReferencedSOPInstanceUID", "") or "")
            reason = item.get("FailureReason")
            failed.append((uid, f"{dest.name} did not commit it (failure reason "
                                f"0x{int(reason or 0):04X})"))
        self.ledger.committed_by(dest.name, committed, "committed")
        for uid, why in failed:
            self.ledger.committed_by(dest.name, [uid], "failed", why)
        log.info("%s committed %d instance(s), %d failed (transaction %s)", dest.name,
                 len(committed), len(failed), info.get("TransactionUID", "?"))
        return 0x0000, None

    # --- the worker ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="commitment", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def run(self) -> None:
        while not self._stop.wait(TICK):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the worker must go on
                log.exception("storage commitment: a round failed")

    def tick(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        if self.handles_objects:
            for dest in self.config.destinations:
                if dest.commitment:
                    self._ask_pacs(dest, now)
            if now - self._last_prune > PRUNE_EVERY:
                self._last_prune = now
                self.ledger.prune(now - max(2 * self.timeout, 86400.0))
        for tx in self.ledger.transactions():
            if not self._mine(tx) or tx.next_try > now:
                continue
            verdicts = self.verdicts(tx, now)
            if any(v.state == "pending" for v in verdicts):
                continue
            self._report(tx, verdicts, now)

    def _mine(self, tx: Transaction) -> bool:
        with self._lock:
            if tx.uid in self._answering.values():
                return False  # its success is not sent yet
            if tx.uid in self._live:
                return True
        if tx.owner is not None and tx.owner != os.getpid() and pid_alive(tx.owner):
            return False  # another process holds its association
        return self.handles_objects

    def verdicts(self, tx: Transaction, now: float) -> list[Instance]:
        outcomes = self.ledger.outcomes([uid for _, uid in tx.instances])
        expired = now >= tx.deadline
        return [verdict(cls, uid, outcomes.get(uid, []), self.committing, expired)
                for cls, uid in tx.instances]

    def _report(self, tx: Transaction, verdicts: list[Instance], now: float) -> None:
        event_type, ds = report_dataset(tx.uid, verdicts)
        with self._lock:
            assoc = self._live.get(tx.uid)
        via, error = "", ""
        if assoc is not None and assoc.is_established:
            via = "the request's association"
            error = _send_unless_released(assoc, ds, event_type, self.config.sender.timeout)
            if error:
                log.info("transaction %s: report on the request's association failed (%s)",
                         tx.uid, error)
            with self._lock:
                self._live.pop(tx.uid, None)
        if (assoc is None or error) and not self.handles_objects:
            self.ledger.release_owner(tx.uid)  # the objects' process sends it
            return
        if assoc is None or error:
            modality = self.config.modality(tx.requester)
            if modality is None:
                error = (f"{tx.requester} has no [[modalities]] entry: nowhere to send its "
                         "report (add one)")
            else:
                via = f"a new association to {modality.describe()}"
                error = self._send_new(modality, ds, event_type)
        committed = sum(v.state == "committed" for v in verdicts)
        failed = len(verdicts) - committed
        if error:
            attempts = tx.attempts + 1
            delay = backoff_delay(attempts, self.config.sender.retry_initial,
                                  self.config.sender.retry_max)
            self.ledger.retry_later(tx.uid, attempts, now + delay, error)
            if attempts == 1 or attempts % 10 == 0:
                log.warning("transaction %s: its report to %s could not be delivered (%s): "
                            "again in %.0f s", tx.uid, shown(tx.requester), error, delay)
            self.events.emit(CommitmentDeferred(transaction=tx.uid, requester=tx.requester,
                                                host=tx.host, instances=len(verdicts),
                                                detail=error, retry_in=delay))
            return
        self.ledger.reported(tx.uid, committed, failed)
        failures = tuple(f"{v.sop_instance}: 0x{v.reason:04X} {v.why}" for v in verdicts
                         if v.state != "committed")
        log.info("transaction %s of %s reported on %s: %d committed, %d failed", tx.uid,
                 shown(tx.requester), via, committed, failed)
        self.events.emit(CommitmentReported(transaction=tx.uid, requester=tx.requester,
                                            host=tx.host, instances=len(verdicts),
                                            committed=committed, failed=failed, via=via,
                                            failures=failures))

    def _ae(self, title: str) -> AE:
        ae = AE(ae_title=title)
        timeout = self.config.sender.timeout
        for name in ("acse_timeout", "dimse_timeout", "network_timeout",
                     "connection_timeout"):
            setattr(ae, name, timeout)
        return ae

    def _send_new(self, modality: Modality, ds: Dataset, event_type: int) -> str:
        """The report on an association of our own: we are the class's SCP there (role
        selection), as the standard has it. '' when the modality answered success."""
        ae = self._ae(self.config.receiver.ae_title)
        ae.requested_contexts = [build_context(StorageCommitmentPushModel)]
        try:
            tls_args = (client_context(modality.tls), modality.host) if modality.tls else None
        except (OSError, ValueError) as exc:
            return f"cannot load the TLS files of {modality.ae_title}: {exc}"
        assoc = ae.associate(modality.host, modality.port, ae_title=modality.ae_title,
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
                             tls_args=tls_args, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
        if not assoc.is_established:
            return (f"{modality.describe()}: association rejected" if assoc.is_rejected
                    else f"{modality.describe()}: cannot connect")
        try:
            return _send(assoc, ds, event_type)
        finally:
            if assoc.is_established:
                assoc.release()

    def _ask_pacs(self, dest: Destination, now: float) -> None:
        """Ask a destination with commitment = true to commit what it got (one N-ACTION per
        round, up to 500 instances)."""
        self.ledger.ask_again(dest.name, now - ASK_AGAIN_AFTER)
        rows = self.ledger.to_ask(dest.name)
        if not rows:
            return
        ds = Dataset()
        ds.TransactionUID = generate_uid()
        items = []
        for _, cls, uid in rows:
            item = Dataset()
            item.ReferencedSOPClassUID = cls
            item.ReferencedSOPInstanceUID = uid
            items.append(item)
        ds.ReferencedSOPSequence = items
        ae = self._ae(self.config.sender.calling_ae_title)
        ae.requested_contexts = [build_context(StorageCommitmentPushModel)]
        tls_args = (client_context(dest.tls), dest.host) if dest.tls else None
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay),
                                           (evt.EVT_N_EVENT_REPORT, self.on_report)])
        if not assoc.is_established:
            log.debug("%s: cannot ask for storage commitment now", dest.name)
            return
        try:
            status, _ = assoc.send_n_action(ds, REQUEST_COMMITMENT, StorageCommitmentPushModel,
                                            StorageCommitmentPushModelInstance)
        finally:
            if assoc.is_established:
                assoc.release()
        code = int(status.get("Status", -1)) if status is not None and "Status" in status \
            else -1
        if code != 0:
            log.warning("%s refused the storage commitment request (status %s)", dest.name,
                        "none" if code < 0 else f"0x{code:04X}")
            return
        self.ledger.asked(dest.name, [obj for obj, _, _ in rows])
        log.info("%s asked to commit %d instance(s) (transaction %s)", dest.name, len(rows),
                 ds.TransactionUID)


def _send(assoc: Any, ds: Dataset, event_type: int) -> str:
    """Send the report on an association of our own; '' when answered with success, else
    why not."""
    try:
        status, _ = assoc.send_n_event_report(ds, event_type, StorageCommitmentPushModel,
                                              StorageCommitmentPushModelInstance)
    except Exception as exc:  # noqa: BLE001 - a peer gone mid-way is a failed attempt
        return f"{type(exc).__name__}: {exc}"
    return _judged(status)


def _send_unless_released(assoc: Any, ds: Dataset, event_type: int, timeout: float) -> str:
    """The report on the modality's own association (we are its acceptor): pynetdicom's
    send_n_event_report, but a wait for the response that also ends when the modality asks
    to release. A modality that lets go right after the N-ACTION-RSP (dcm4che's stgcmtscu
    with a port of its own) sends its A-RELEASE-RQ as the report crosses it, and does not
    answer the report then; pynetdicom, waiting for that answer with the association's
    reactor held, would leave the release unanswered until the DIMSE timeout and then abort,
    and the modality gives up on the association. Here the wait ends, the reactor answers the
    release, and the caller sends the report on a new association. And a request of the
    modality's that comes meanwhile is left to the reactor, not taken for the response.
    '' when answered with success, else why not."""
    try:
        context = assoc._get_valid_context(StorageCommitmentPushModel, "", None)
        syntax = context.transfer_syntax[0]
        request = N_EVENT_REPORT()
        request.MessageID = 1
        request.AffectedSOPClassUID = StorageCommitmentPushModel
        request.AffectedSOPInstanceUID = StorageCommitmentPushModelInstance
        request.EventTypeID = event_type
        request.EventInformation = BytesIO(encode(ds, syntax.is_implicit_VR,
                                                  syntax.is_little_endian, syntax.is_deflated))
    except Exception as exc:  # noqa: BLE001 - no context for it, or not encodable
        return f"{type(exc).__name__}: {exc}"
    deadline = time.monotonic() + timeout
    held: list[Any] = []  # the modality's own requests meanwhile: the reactor serves them
    response = None
    assoc._reactor_checkpoint.clear()  # the response is ours to read, not the reactor's
    try:
        assoc.dimse.send_msg(request, context.context_id)
        while True:
            item = assoc.dimse.get_msg(block=False)
            if item[1] is not None:
                if _answers(item[1], request):
                    response = item[1]
                    break
                # e.g. its next N-ACTION-RQ, sent on the association it keeps: pynetdicom
                # took it for the response, and the request was never answered.
                held.append(item)
                continue
            pending = assoc.dul.peek_next_pdu()
            if isinstance(pending, A_RELEASE) and pending.result is None:
                return "the modality released the association before answering"
            if assoc.acse.is_aborted() or not assoc.dul.is_alive():
                return "the association ended before the modality answered"
            if time.monotonic() > deadline:
                assoc.abort()
                return "no response to the N-EVENT-REPORT"
            time.sleep(0.005)
    finally:
        if held:  # back at the head of the queue, in the order they came
            queue = assoc.dimse.msg_queue
            with queue.mutex:
                queue.queue.extendleft(reversed(held))
        assoc._reactor_checkpoint.set()  # the reactor answers the release, if one came
    return _judged(assoc._check_received_status(response))


def _answers(message: Any, request: Any) -> bool:
    """Whether a DIMSE message off the queue is the response to our N-EVENT-REPORT-RQ."""
    return (isinstance(message, N_EVENT_REPORT) and message.MessageID is None
            and message.MessageIDBeingRespondedTo == request.MessageID)


def _judged(status: Any) -> str:
    """'' for a response with success, else why not."""
    if status is None or "Status" not in status:
        return "no response to the N-EVENT-REPORT"
    code = int(status.Status)
    if code != 0:
        return f"the modality answered 0x{code:04X}"
    return ""

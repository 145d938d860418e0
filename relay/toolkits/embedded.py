"""The embedded engine: pydicom + pynetdicom, in Python. Needs nothing but `pip install`.
Under `dicom-relay run` its receiver is a `dicom-relay receive` child process (see
EmbeddedReceiverProcess); under `dicom-relay receive` it runs in that process.

Two facts shape it (measured, see design.md): pynetdicom never sets TCP_NODELAY, and without it
every C-STORE stalls ~88 ms on loopback, so both ends set it on EVT_CONN_OPEN; and sending reads
each file in chunks without decoding it, so the transfer syntax and bytes go out as stored.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from relay.edit.scan import inflate_excess
from relay.ops.logs import shown
from relay.receive.floor import floor_of
from relay.receive.guard import MAX_SMALL_PDU, Guard, Limits, install, uninstall
from relay.receive.supervisor import LOG_PLAIN_ENV, SupervisedReceiver
from relay.send.results import (
    Context,
    DestinationUnavailable,
    Outcome,
    Outgoing,
    SendResult,
    ToolFailure,
    classify_status,
    local_failures,
    read_outgoing,
    retry_all,
)
from relay.spool import PARTIAL_SUFFIX, safe_name
from relay.toolkits.associations import (
    accept_tls_later,
    cheap_to_copy,
    file_head,
    open_connection,
    prefer_requestor_syntax,
    refused_host,
    serve,
    set_nodelay,
    shut_down,
)
from relay.toolkits.base import Engine, Receiver
from relay.toolkits.common import MAX_CONTEXTS, context_groups
from relay.toolkits.tls import client_context, server_context

if TYPE_CHECKING:
    from relay.config.model import Config, Destination
    from relay.services.scp import Services
    from relay.spool import Spool

log = logging.getLogger("relay.embedded")

# Send files from disk in PDU-sized chunks without decoding them (memory stays flat, the
# original encoding goes out untouched).
_config.STORE_SEND_CHUNKED_DATASET = True


def _any_uid(value: str) -> tuple[bool, str]:
    """pynetdicom's validator of UI values, replaced: it refused (aborting the association)
    a C-STORE whose SOP Instance UID is not a UID, coming in or going out. Such an object is
    stored and forwarded as it came: the relay never makes a name, a path, a list entry or
    an unescaped log line of a UID (relay.spool.safe_name, toolkits.common.is_uid,
    ops.logs.shown), and the PACS judges the UID."""
    del value
    return True, ""


_config.VALIDATORS["UI"] = _any_uid

READY_LINE = "embedded receiver listening"  # logged once it is; its supervisor waits for it
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
C_STORE_RQ = 0x0001  # Command Field


def _fixed_mmap_threshold() -> None:
    """pynetdicom assembles each received data set in a growing buffer. With glibc's dynamic
    mmap threshold, buffers of tens of MB end up on the heap, where growing copies them and
    freeing does not return them: receiving 24 MB objects peaked at ~2.4x their size in RSS.
    A fixed threshold keeps every block over 128 KiB in its own mapping (grown by mremap,
    returned when freed): ~1.4x measured. glibc only; elsewhere nothing changes."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


class ContextsRefused(DestinationUnavailable):
    """The destination answered but accepted none of the proposed presentation contexts."""


class EmbeddedReceiver(Receiver):
    """pynetdicom Storage SCP: every storage SOP class, every transfer syntax it knows; with
    `services`, query/retrieve and storage commitment too (relay.services), on the same
    port."""

    def __init__(self, config: Config, spool: Spool,
                 services: Services | None = None) -> None:
        self.config = config.receiver
        self.spool = spool
        self.services = services
        self.query = services.query if services is not None else None
        self.commitment = services.commitment if services is not None else None
        self.commitment_aets = [d.ae_title for d in config.destinations if d.commitment]
        self.server: Any = None
        self.networks = [ipaddress.ip_network(h, strict=False)
                         for h in config.receiver.allowed_hosts]
        self.max_object = config.receiver.max_object_mb * 1024 * 1024
        self.guard: Guard | None = None
        self.floor = floor_of(config)
        self._refusing = False

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        if self.query is not None:
            # Storage both ways: a C-GET requester takes its objects as SCP.
            ae.supported_contexts = []
            self.query.add_contexts(ae, storage=True)
            ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        if self.commitment is not None:
            self.commitment.add_contexts(ae)
        ae.require_called_aet = (self.query is None
                                 or not self.query.answers_two_titles(self.config.ae_title))
        ae.require_calling_aet = list(self.config.allowed_calling_aets)
        if ae.require_calling_aet and self.commitment is not None:
            # PACSes reporting what the relay asked them to commit (commitment = true).
            ae.require_calling_aet += self.commitment_aets
        ae.maximum_associations = self.config.max_associations
        ae.network_timeout = self.config.idle_timeout
        # The A-ASSOCIATE-RQ follows the connection at once: a connection that sends none (a
        # TCP health probe) holds an association slot only this long.
        ae.acse_timeout = max(1.0, min(10.0, self.config.idle_timeout / 2))
        ae.dimse_timeout = self.config.request_timeout
        return ae

    def on_store(self, event: evt.Event) -> int:
        """Write the object to a temporary name, fsync, rename into incoming/: only then
        answer success. A failure to store answers Out of Resources (the modality retries)."""
        request = event.request
        if self.query is not None:
            # A sub-operation of the relay's own C-MOVE to the PACS: not a new study.
            retrieved = self.query.inboxes.accept(event)
            if retrieved is not None:
                return retrieved
        name = safe_name(request.AffectedSOPInstanceUID)
        try:
            head = file_head(event)
            data_set = request.DataSet
            assert data_set is not None
        except Exception as exc:  # noqa: BLE001 - any encoding problem: refuse, don't store
            log.error("C-STORE from %s: cannot encode the received object (%s): refused",
                      shown(event.assoc.requestor.ae_title), exc)
            return STATUS_CANNOT_UNDERSTAND
        if str(event.context.transfer_syntax) == DeflatedExplicitVRLittleEndian:
            with data_set.getbuffer() as body:
                why = inflate_excess([body], self.max_object)
            if why:
                log.error("C-STORE from %s: %s refused: %s", shown(event.assoc.requestor.ae_title),
                          shown(str(request.AffectedSOPInstanceUID)), why)
                return STATUS_CANNOT_UNDERSTAND
        try:
            # The data set exactly as sent (never decoded), written from pynetdicom's receive
            # buffer itself: encoded_dataset() would copy it, twice with the file meta; a
            # 24 MB object then cost ~100 MB of RSS.
            with data_set.getbuffer() as body:
                size = len(head) + len(body)
                self.floor.seen(size)
                if not self._room_for(size):
                    return STATUS_OUT_OF_RESOURCES
                self.spool.write_incoming(name, head, body)
        except OSError as exc:
            log.error("C-STORE from %s: cannot store %s (%s): answered Out of Resources",
                      shown(event.assoc.requestor.ae_title), name, exc.strerror or exc)
            return STATUS_OUT_OF_RESOURCES
        log.debug("received %s from %s", name, shown(event.assoc.requestor.ae_title))
        return 0x0000

    def _room_for(self, size: int) -> bool:
        """Whether storing `size` bytes leaves the free-space floor: below it the receiver
        answers Out of Resources (the modality sends later), before the disk is full."""
        room = self.floor.room_for(size)
        if room != (not self._refusing):
            self._refusing = not room
            if room:
                log.warning("room again (%s): objects are taken again", self.floor.describe())
            else:
                log.warning("below the free-space floor (%s): objects are answered Out of "
                            "Resources (0xA700) until there is room", self.floor.describe())
        return room

    @staticmethod
    def on_dimse_recv(event: evt.Event) -> None:
        """A C-STORE-RQ whose Affected SOP Class UID is not the abstract syntax of the
        presentation context it came on (dcmsend sends the class it misread from the data
        set of pydicom's rtdose_rle.dcm: '31') finds no service in pynetdicom, which aborts
        the association: every later object of the send fails, and so does the modality's
        retry. DCMTK's storescp stores such an object; so do we, under the negotiated class,
        and the association goes on."""
        message = event.message
        command = message.command_set
        if command is None or command.get("CommandField") != C_STORE_RQ:
            return
        negotiated = next((cx.abstract_syntax for cx in event.assoc.accepted_contexts
                           if cx.context_id == message.context_id), None)
        claimed = str(command.get("AffectedSOPClassUID", ""))
        if negotiated is None or claimed == negotiated:
            return
        log.warning("C-STORE from %s: SOP Class UID %s of %s is not the presentation "
                    "context's (%s): received under the context's class",
                    shown(event.assoc.requestor.ae_title), shown(claimed),
                    shown(str(command.get("AffectedSOPInstanceUID", "?"))), negotiated)
        command.AffectedSOPClassUID = negotiated

    def on_conn_open(self, event: evt.Event) -> None:
        assert self.guard is not None
        assoc_socket = getattr(event.assoc.dul, "socket", None)
        if open_connection(event, self.guard.limits.negotiation, self.config.idle_timeout) \
                and assoc_socket is not None:
            # What it may send before it is authorised (relay.receive.guard).
            self.guard.opened(assoc_socket)

    def on_conn_close(self, event: evt.Event) -> None:
        assoc_socket = getattr(event.assoc.dul, "socket", None)
        if self.guard is not None and assoc_socket is not None:
            self.guard.closed(assoc_socket)

    def on_requested(self, event: evt.Event) -> None:
        """A-ASSOCIATE-RQ: refuse a peer outside `allowed_hosts`, else negotiate."""
        if refused_host(event, self.networks):
            return
        own = self.config.ae_title
        if (self.query is not None and self.query.answers_two_titles(own)
                and self.query.refuse_unknown_called_ae(event, own)):
            return
        prefer_requestor_syntax(event)
        if self.query is not None:
            self.query.drop_contexts_if_not_allowed(event)

    def start(self) -> None:
        _fixed_mmap_threshold()
        # Partial writes of a previous run that died: never acknowledged, never complete.
        self.spool.quarantine_unfinished(
            sorted(self.spool.incoming.glob(f".*{PARTIAL_SUFFIX}")),
            "the relay stopped while receiving it; the sender got no success and sends again")
        ae = self._make_ae()
        rc = self.config
        self.guard = Guard(Limits(
            max_pdu=ae.maximum_pdu_size or MAX_SMALL_PDU, negotiation=ae.acse_timeout,
            request_timeout=rc.request_timeout, idle_timeout=rc.idle_timeout,
            max_object=self.max_object,
            # A host's share, when it is less than the whole: the whole is pynetdicom's
            # max_associations, whose refusal is an A-ASSOCIATE-RJ (transient: try later).
            per_host=rc.per_host if rc.per_host < rc.max_associations else 0))
        install(self.guard)
        handlers = [(evt.EVT_C_STORE, self.on_store), (evt.EVT_CONN_OPEN, self.on_conn_open),
                    (evt.EVT_CONN_CLOSE, self.on_conn_close),
                    (evt.EVT_REQUESTED, self.on_requested),
                    (evt.EVT_DIMSE_RECV, self.on_dimse_recv)]
        if self.query is not None:
            self.query.start()
            handlers += self.query.handlers()
        if self.commitment is not None:
            handlers += self.commitment.handlers()
        address = (self.config.host, self.config.port)
        ssl_context = server_context(self.config.tls) if self.config.tls else None
        try:
            self.server = ae.make_server(address, evt_handlers=handlers,
                                         server_class=ThreadedAssociationServer,
                                         ssl_context=ssl_context,
                                         contexts=cheap_to_copy(ae.supported_contexts))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"port {self.config.port} on {self.config.host} is "
                              "already in use: is another relay or storescp running? "
                              "(change [receiver].port)") from None
            raise
        # Changed before it serves: not one connection may come the unguarded way.
        accept_tls_later(self.server)
        self._guard_connections(self.server, self.guard)
        serve(ae, self.server, "embedded-receiver")
        log.info("%s as %s on %s:%d%s", READY_LINE, self.config.ae_title, *address,
                 " (TLS only)" if ssl_context else "")

    @staticmethod
    def _guard_connections(server: Any, guard: Guard) -> None:
        """Each host's share of the receiver is checked as its connection is accepted, before
        pynetdicom makes an association of it (socketserver's verify_request): a refused
        connection never holds one of max_associations, even for a moment."""
        verify, shutdown = server.verify_request, server.shutdown_request

        def verify_request(request: Any, client_address: Any) -> bool:
            host = str(client_address[0]) if isinstance(client_address, tuple) else "?"
            return bool(guard.admit(request, host) and verify(request, client_address))

        def shutdown_request(request: Any) -> None:
            guard.dropped(request)
            shutdown(request)

        server.verify_request = verify_request
        server.shutdown_request = shutdown_request

    def stop(self) -> None:
        if self.server is not None:
            # Peers still connected would keep shutdown() waiting for their threads: aborted.
            shut_down(self.server)
            self.server = None
        uninstall()


class EmbeddedReceiverProcess(SupervisedReceiver, Receiver):
    """The embedded receiver in a process of its own (`dicom-relay receive`, same config),
    supervised like storescp, when this process also edits and sends. Python runs one thread
    at a time per process: sharing one interpreter, receiving and forwarding took turns
    (500 small objects 3.4-3.8 s, 10 x 24 MB 2.6 s; as two processes 2.8-3.2 s and 1.75 s,
    measured). If the relay is killed the child goes at once (SIGKILL): what it had not
    acknowledged, the modality sends again, and its start quarantines any partial file."""

    toolkit = "embedded"
    name = "receiver"
    enforces_allow_lists = True  # the child is the embedded receiver: it checks them
    death_signal = signal.SIGKILL
    # Not probed by connecting: a bare connection would hold one of max_associations.
    ready_line = READY_LINE

    def __init__(self, config: Config) -> None:
        argv = [sys.executable, "-m", "relay", "receive", "--config", str(config.source)]
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            argv.append("--verbose")
        # Its log lines come through ours (a line each): no second time stamp in them.
        env = {**os.environ, LOG_PLAIN_ENV: "1"}
        super().__init__(config, argv, host=config.receiver.host, env=env)


class EmbeddedEngine(Engine):
    name = "embedded"

    def __init__(self) -> None:
        # Associations kept between batches (send(keep_open=True)), per (destination, calling
        # AE): the association and the contexts it proposed. A burst then costs one
        # association, not one per batch (each costs threads, a connection, a negotiation).
        self._kept: dict[tuple[str, str], tuple[Any, list[Context]]] = {}
        self._lock = threading.Lock()

    def release(self, destination: Destination) -> None:
        with self._lock:
            kept = [self._kept.pop(key) for key in list(self._kept) if key[0] == destination.name]
        for assoc, _ in kept:
            if assoc.is_established:
                assoc.release()

    def receiver(self, config: Config, spool: Spool, beside_work: bool = False,
                 services: Services | None = None) -> Receiver:
        if beside_work and config.source.is_file():
            # The child (`dicom-relay receive`) makes its own query/retrieve service.
            return EmbeddedReceiverProcess(config)
        return EmbeddedReceiver(config, spool, services)

    def _associate(self, destination: Destination, calling_ae: str, timeout: float,
                   contexts: list[Context]) -> Any:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        ae.connection_timeout = timeout
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        connected: list[bool] = []

        def on_open(event: evt.Event) -> None:
            connected.append(True)
            set_nodelay(event)

        try:
            tls_args = ((client_context(destination.tls), destination.host)
                        if destination.tls else None)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            # A key, certificate or CA file gone or unreadable since start-up: ours to fix.
            raise ToolFailure(f"local tool failure: cannot load {destination.name}'s TLS "
                              f"files: {exc}") from None
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[(evt.EVT_CONN_OPEN, on_open)], tls_args=tls_args)
        if not assoc.is_established:
            if connected and assoc.rejected_contexts and not assoc.accepted_contexts:
                # It answered, and refused every context we proposed: sending the same files
                # again will not change that, and retrying would block the queue behind them.
                raise ContextsRefused(f"{destination.name} accepts none of the presentation "
                                      "contexts proposed (SOP class / transfer syntax)")
            if not connected:
                why = "cannot connect (refused, unreachable or timed out)"
            elif assoc.is_rejected:
                why = "association rejected"
            else:
                why = "association aborted"
            raise DestinationUnavailable(
                f"{destination.name} ({destination.ae_title}@{destination.host}:"
                f"{destination.port}): {why}")
        return assoc

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False,
             confirm_each: bool = True) -> Iterator[SendResult]:
        del confirm_each  # each result comes with its response anyway
        ready, unreadable = read_outgoing(files)
        yield from unreadable
        # One association per batch, split only when it needs over 128 contexts.
        groups = context_groups(ready, lambda item: item.context)
        for i, (batch, contexts) in enumerate(groups):
            yield from self._send_batch(batch, contexts, destination, calling_ae, timeout,
                                        keep_open and i == len(groups) - 1)

    def _kept_association(self, key: tuple[str, str], contexts: list[Context]
                          ) -> tuple[Any, list[Context]]:
        """The association kept for `key` if it is still up and proposed every context this
        batch needs: (association, its proposed contexts). Otherwise (None, the contexts a
        new association should propose: this batch's, then the kept one's, up to 128)."""
        with self._lock:
            kept = self._kept.pop(key, None)
        if kept is None:
            return None, contexts
        assoc, proposed = kept
        if assoc.is_established and all(cx in proposed for cx in contexts):
            return assoc, proposed
        if assoc.is_established:
            assoc.release()
        extra = [cx for cx in proposed if cx not in contexts]
        return None, contexts + extra[:MAX_CONTEXTS - len(contexts)]

    def _send_batch(self, batch: list[Outgoing], contexts: list[Context],
                    destination: Destination, calling_ae: str, timeout: float,
                    keep_open: bool) -> Iterator[SendResult]:
        key = (destination.name, calling_ae)
        assoc, contexts = self._kept_association(key, contexts)
        try:
            if assoc is None:
                assoc = self._associate(destination, calling_ae, timeout, contexts)
        except ContextsRefused as exc:
            for item in batch:
                yield SendResult(item.path, Outcome.FAILED, None,
                                 f"{exc}: {item.sop_class_uid} in {item.transfer_syntax}",
                                 refused_syntax=True)
            return
        except DestinationUnavailable as exc:
            yield from retry_all([item.path for item in batch], str(exc))
            return
        except ToolFailure as exc:
            yield from local_failures([item.path for item in batch],
                                      str(exc).removeprefix("local tool failure: "))
            return
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0])
                    for cx in assoc.accepted_contexts}
        try:
            for i, item in enumerate(batch):
                path = item.path
                if item.context not in accepted:
                    yield SendResult(path, Outcome.FAILED, None,
                                     f"{destination.name} accepts no presentation context for "
                                     f"SOP class {item.sop_class_uid} in transfer syntax "
                                     f"{item.transfer_syntax}", refused_syntax=True)
                    continue
                if not assoc.is_established:
                    yield from retry_all([rest.path for rest in batch[i:]], "association lost")
                    return
                try:
                    status = assoc.send_c_store(path)
                except (OSError, ValueError, AttributeError) as exc:
                    yield SendResult(path, Outcome.FAILED, None, f"cannot send: {exc}")
                    continue
                if "Status" not in status:
                    # No response: aborted, reset or timed out. Not stored as far as we know.
                    yield SendResult(path, Outcome.RETRY, None,
                                     "no C-STORE response (association aborted or timed out)",
                                     in_flight=True)
                    continue
                code = int(status.Status)
                comment = str(status.get("ErrorComment", "") or "")
                yield SendResult(path, classify_status(code), code, comment)
        finally:
            if assoc.is_established:
                if keep_open:
                    with self._lock:
                        self._kept[key] = (assoc, contexts)
                else:
                    assoc.release()

    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None:
        assoc = self._associate(destination, calling_ae, timeout,
                                [(Verification, "1.2.840.10008.1.2")])
        try:
            status = assoc.send_c_echo()
        finally:
            if assoc.is_established:
                assoc.release()
        if "Status" not in status or int(status.Status) != 0:
            raise DestinationUnavailable(f"{destination.name}: C-ECHO got no success response")


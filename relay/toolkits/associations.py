"""What every pynetdicom user in the relay shares (the embedded engine's receiver and sender,
the query/retrieve services): TCP_NODELAY on each association, the requestor's transfer
syntax order, supported contexts cheap to copy per association, the file head of a
received data set, and a server's shutdown."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import struct
import threading
from typing import Any

from pynetdicom import (
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    build_context,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from relay.ops.logs import shown
from relay.ops.servers import shutdown_now

log = logging.getLogger("relay.receive")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: turn Nagle off on this association's socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve(ae: Any, server: Any, name: str) -> threading.Thread:
    """Serve `server` (from ae.make_server(), changed as needed: accept_tls_later(), a
    guard) in a thread of our own, registered with its AE as start_server() would, for the
    server's shutdown() to find it there. start_server() serves at once: a connection that
    came before the server was changed went pynetdicom's way (a TLS handshake in the accepting
    thread, which a silent peer held for ever)."""
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


def accept_tls_later(server: Any) -> None:
    """pynetdicom's server makes each TLS handshake in the thread that accepts every
    connection: one peer that never sends its ClientHello kept every other one waiting. Here
    a connection is accepted as it comes and makes its handshake in its own thread
    (open_connection(), from EVT_CONN_OPEN). Nothing to do for a server without TLS."""
    if not server.ssl_context:
        return
    # The connections whose handshake open_connection() is making: not associations yet
    # (pynetdicom lists one once its thread starts), so shut_down() finds them here.
    server.relay_handshaking = set()

    def get_request() -> tuple[Any, Any]:
        client, address = server.socket.accept()
        return server.ssl_context.wrap_socket(client, server_side=True,
                                              do_handshake_on_connect=False), address

    server.get_request = get_request


def open_connection(event: evt.Event, negotiation: float, idle_timeout: float) -> bool:
    """EVT_CONN_OPEN of a server that accepts with accept_tls_later(): Nagle off, the TLS
    handshake in this connection's own thread within `negotiation` seconds (a failed one is
    logged and the connection closed: False), then the socket's timeout, `idle_timeout`:
    pynetdicom's idle timer runs only between PDUs, and a peer that stops in the middle of
    one would hold its thread (and a clean shutdown) for ever."""
    set_nodelay(event)
    assoc_socket = getattr(event.assoc.dul, "socket", None)
    sock = getattr(assoc_socket, "socket", None)
    if assoc_socket is None or sock is None:
        return True
    if isinstance(sock, ssl.SSLSocket):
        server = getattr(event.assoc, "_server", None)
        handshaking: set[ssl.SSLSocket] = getattr(server, "relay_handshaking", set())
        sock.settimeout(negotiation)
        handshaking.add(sock)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            if not getattr(server, "relay_stopping", False):
                log.warning("connection from %s closed: TLS handshake failed (%s)",
                            event.address[0], exc)
            assoc_socket.close()
            return False
        finally:
            handshaking.discard(sock)
    sock.settimeout(idle_timeout)
    return True


# The states in which pynetdicom takes an A-ABORT request (PS3.8 9.2: Evt15). A connection
# that has sent no A-ASSOCIATE-RQ yet (Sta2) is not one: aborting it raised InvalidEventError
# in its reactor thread (a traceback in the log of a relay stopped with a silent peer on).
ABORTABLE = frozenset(f"Sta{n}" for n in range(3, 13))


def shut_down(server: Any) -> None:
    """A pynetdicom server's shutdown() (its loop, its socket, its AE's list), at once
    (relay.ops.servers). Peers' associations are aborted first (an object not yet
    acknowledged is sent again by its modality); a connection still silent is hung up on,
    its own thread seeing it closed: left alone, it kept the process from exiting until its
    peer or a timer ended it. So is a TLS connection still in its handshake (socketserver's
    close waits for its thread: a silent peer held a stop up to the negotiation deadline)."""
    server.relay_stopping = True
    for sock in list(getattr(server, "relay_handshaking", ())):
        with contextlib.suppress(OSError):  # closed, or closing
            sock.shutdown(socket.SHUT_RDWR)
    for assoc in list(server.active_associations):
        if assoc.dul.state_machine.current_state in ABORTABLE:
            assoc.abort()
        else:
            with contextlib.suppress(OSError, AttributeError):  # closed, or closing
                assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)
    shutdown_now(server)


class _CheapToCopy(PresentationContext):  # type: ignore[misc]  # pynetdicom: untyped here
    """A supported context whose copy costs a list, not a deep copy of every UID in it.

    pynetdicom's server deep-copies its supported contexts for each association it accepts:
    every storage class with every transfer syntax (~8,000 UIDs) took 46 ms per association,
    measured, on the services port's and the embedded receiver's, a modality sending an
    association per object paying it each time. The UIDs are immutable strings and may be
    shared; the lists are copied, as a deep copy would."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _CheapToCopy:
        copied = _CheapToCopy.__new__(_CheapToCopy)
        copied.__dict__.update(self.__dict__)
        copied.__dict__.update({name: list(value) for name, value in self.__dict__.items()
                                if isinstance(value, list)})
        return copied


def cheap_to_copy(contexts: list[PresentationContext]) -> list[PresentationContext]:
    """The contexts a pynetdicom server supports (its `contexts=`), as _CheapToCopy."""
    cheap: list[PresentationContext] = []
    for cx in contexts:
        copied = _CheapToCopy.__new__(_CheapToCopy)
        copied.__dict__.update(vars(cx))
        cheap.append(copied)
    return cheap


def prefer_requestor_syntax(event: evt.Event) -> None:
    """EVT_REQUESTED handler: accept the transfer syntax the modality proposed first.

    pynetdicom picks, per context, the first transfer syntax in *our* list that the peer
    proposed. DCMTK's dcmsend proposes [RLE, Explicit LE, …] for an RLE file: with a fixed
    list we would take Explicit LE and the modality would decompress the image for us. The
    relay must keep what it was sent, so our preference follows theirs, per association.
    """
    proposed: dict[str, list[list[str]]] = {}
    for cx in event.assoc.requestor.requested_contexts:
        if cx.transfer_syntax:
            proposed.setdefault(cx.abstract_syntax, []).append(list(cx.transfer_syntax))
    contexts = []
    for cx in event.assoc.acceptor.supported_contexts:
        lists = proposed.get(cx.abstract_syntax)
        if lists:
            # One order must serve every context of this SOP class. dcmsend proposes
            # [ELE, EBE, ILE] and [RLE, ELE, EBE, ILE] for MR side by side: putting the first
            # choice that appears in the fewest contexts first (RLE) gives each its first.
            firsts = dict.fromkeys(tss[0] for tss in lists)
            first = sorted(firsts, key=lambda ts: sum(ts in tss for tss in lists))
            ours = list(cx.transfer_syntax)
            order = [ts for ts in first if ts in ours]
            roles = cx.scu_role, cx.scp_role  # C-GET's role selection is kept
            cx = build_context(cx.abstract_syntax, order + [ts for ts in ours if ts not in order])
            cx.scu_role, cx.scp_role = roles
        contexts.append(cx)
    event.assoc.acceptor.supported_contexts = contexts


def file_head(event: evt.Event) -> bytes:
    """Preamble and file meta for a data set received by C-STORE: what pydicom's
    write_file_meta_info writes for pynetdicom's `event.file_meta`, plus the calling AE title
    (0002,0016) as DCMTK does, encoded here: building and encoding it with pydicom took a
    third of a retrieve's time per object (bench/query.py). tests/test_associations.py
    proves the bytes the same."""
    request = event.request
    elements = b"".join((
        _meta(0x0001, b"OB", b"\x00\x01"),
        _meta(0x0002, b"UI", _text(request.AffectedSOPClassUID, b"\x00")),
        _meta(0x0003, b"UI", _text(request.AffectedSOPInstanceUID, b"\x00")),
        _meta(0x0010, b"UI", _text(event.context.transfer_syntax, b"\x00")),
        _meta(0x0012, b"UI", _text(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _meta(0x0013, b"SH", _text(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        _meta(0x0016, b"AE", _text(event.assoc.requestor.ae_title, b" "))))
    length = _meta(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"".join((b"\x00" * 128, b"DICM", length, elements))


def _text(value: object, pad: bytes) -> bytes:
    """A UI, SH or AE value, padded to an even length (UI with NUL, the others a space)."""
    raw = str(value if value is not None else "").encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def _meta(element: int, vr: bytes, value: bytes) -> bytes:
    """A group 0002 element in explicit VR little endian (OB: a 4-byte length)."""
    tag = struct.pack("<HH", 0x0002, element)
    if vr == b"OB":
        return tag + vr + b"\x00\x00" + struct.pack("<I", len(value)) + value
    if len(value) > 0xFFFF:
        raise ValueError(f"({0x0002:04X},{element:04X}) too long for the file meta")
    return tag + vr + struct.pack("<H", len(value)) + value


def refused_host(event: evt.Event, networks: list[Network]) -> bool:
    """EVT_REQUESTED: reject a peer outside [receiver].allowed_hosts (when it lists any);
    True when rejected."""
    if not networks:
        return False
    address = event.assoc.requestor.address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if ip is not None and any(ip in net for net in networks):
        return False
    log.warning("association from %s (%s) refused: not in receiver.allowed_hosts",
                address, shown(event.assoc.requestor.ae_title))
    # Rejected permanently, by the service user, no reason given.
    event.assoc.acse.send_reject(0x01, 0x01, 0x01)
    return True


class ReactorGate:
    """pynetdicom's pause of an association's reactor thread (its `_reactor_checkpoint`, a
    threading.Event), without its race. A thread that sends a request (send_c_store, …)
    clears the event and waits for the reactor's `_is_paused`, then reads the response off
    the DIMSE queue. But the reactor sets `_is_paused` just before it waits on the event:
    cleared a moment too late, it passes, and the sender, seeing `_is_paused` still true,
    goes on while the reactor takes the response off the queue ("Received unexpected C-STORE
    service message"): the sender then waits for the DIMSE timeout and counts the object
    failed. Measured here: one C-MOVE of 500 objects in about a dozen through the relay.
    With this gate, `clear()` returns only once the reactor is parked in `wait()`."""

    PARK_TIMEOUT = 1.0  # the reactor parks within a loop (~1 ms); never wait for ever

    def __init__(self, assoc: Any) -> None:
        self._assoc = assoc
        self._cond = threading.Condition()
        self._open = True
        self._parked = False

    def is_set(self) -> bool:
        return self._open

    def set(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._open = False
            # The reactor's own thread (an acceptor serving a request sends from it) and a
            # reactor that is gone have nothing to wait for.
            if threading.current_thread() is self._assoc or not self._assoc.is_alive():
                return
            self._cond.wait_for(lambda: self._parked or self._open, self.PARK_TIMEOUT)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if self._open:
                return True
            self._parked = True
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._open, timeout)
            finally:
                self._parked = False


_association_init = Association.__init__


def _init_with_gate(self: Any, *args: Any, **kwargs: Any) -> None:
    _association_init(self, *args, **kwargs)
    self._reactor_checkpoint = ReactorGate(self)


Association.__init__ = _init_with_gate


def _lenient_context_id(self: Any, value: int | None) -> None:
    """PresentationContext.context_id's setter, taking an even ID as Orthanc and dcm4che do.
    PS3.8 wants odd IDs, and pynetdicom 3.0 raises ValueError for an even one inside its
    reactor, where the association then hangs: but dcm4che's stgcmtscu proposes ID 2 (a real
    modality's request for storage commitment), and the relay must serve it. The IDs the
    relay proposes itself stay odd (pynetdicom numbers them)."""
    if value is not None and not 1 <= value <= 255:
        raise ValueError("'context_id' must be an integer between 1 and 255, inclusive")
    self._context_id = value


PresentationContext.context_id = PresentationContext.context_id.setter(_lenient_context_id)

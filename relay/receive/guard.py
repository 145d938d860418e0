"""What a peer may hold before it is authorised, on the embedded receiver: memory, time and
connection slots.

pynetdicom reads each PDU as its 6-byte header says: an A-ASSOCIATE-RQ that declares 4 GB
is buffered whole (800 MB sent took the receiver to 1.7 GB, from a host `allowed_hosts`
excludes: the check comes after the PDU), and a peer that sends one byte every few seconds
keeps its thread, and one of `max_associations`, for as long as it likes (each byte resets
the socket timeout). DCMTK and dcm4che drop such PDUs at once. pynetdicom cannot be told
to, so the receiver reads through this guard instead (AssociationSocket.recv, acceptors
only):

- a PDU longer than allowed is refused before it is read: an A-ASSOCIATE-RQ (and any other
  PDU but P-DATA-TF) over 64 KiB, a P-DATA-TF over the maximum length we announced;
- the A-ASSOCIATE-RQ must be complete within `negotiation` seconds of the connection;
  every later PDU within `request_timeout` of its header;
- one data set may not exceed `max_object` bytes, and must come at least at RATE_FLOOR
  bytes/s (after `request_timeout` seconds of grace): a trickle cannot extend it;
- one host may hold at most `per_host` connections, so that others always find a slot.

A refusal closes the connection (the peer got no success for anything unfinished) and says
why in the log. The guard depends on how pynetdicom 3 reads a PDU (a 6-byte recv, then one
of the length it declares): tests/security/test_hostile_network.py fails if that changes.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.transport import AssociationSocket

log = logging.getLogger("relay.receive")

A_ASSOCIATE_RQ = 0x01
P_DATA_TF = 0x04
PDU_NAMES = {0x01: "A-ASSOCIATE-RQ", 0x02: "A-ASSOCIATE-AC", 0x03: "A-ASSOCIATE-RJ",
             0x04: "P-DATA-TF", 0x05: "A-RELEASE-RQ", 0x06: "A-RELEASE-RP", 0x07: "A-ABORT"}
# Real A-ASSOCIATE-RQs are a few KB (128 presentation contexts of long UIDs: ~13 KB).
MAX_SMALL_PDU = 64 * 1024
# A data set must arrive at least this fast (bytes/s), after request_timeout seconds of grace:
# 16 KiB/s is a 128 kbit/s line.
RATE_FLOOR = 16 * 1024
READ_SIZE = 256 * 1024


class Refused(OSError):
    """A peer broke a limit: its connection is closed."""


@dataclass(frozen=True)
class Limits:
    max_pdu: int  # the maximum P-DATA-TF length we announce
    negotiation: float  # seconds from connection to a complete A-ASSOCIATE-RQ
    request_timeout: float  # seconds for any later PDU, from its header
    idle_timeout: float  # seconds without a byte
    max_object: int  # bytes of one data set
    per_host: int  # connections one host may hold (0: no share; the global limit only)


@dataclass
class _Peer:
    """What the guard knows of one connection."""

    host: str
    connected: float
    negotiated: bool = False
    header: bytes = b""
    object_bytes: int = 0
    object_started: float | None = None


@dataclass
class Guard:
    limits: Limits
    clock: Callable[[], float] = time.monotonic
    # Connections accepted, by the id of their socket: before pynetdicom made an
    # association of them (pending), then by their AssociationSocket's id (peers).
    _pending: dict[int, _Peer] = field(default_factory=dict)
    _peers: dict[int, _Peer] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _said: dict[str, float] = field(default_factory=dict)  # host -> last refusal logged

    # --- connections ---------------------------------------------------------------------

    def admit(self, request: object, host: str) -> bool:
        """A connection just accepted (the server's verify_request, before pynetdicom makes
        an association of it): False when its host already holds its share."""
        with self._lock:
            held = self._held(host)
            if not self.limits.per_host or held < self.limits.per_host:
                self._pending[id(request)] = _Peer(host, self.clock())
                return True
        self._say(host, f"connection from {host} refused: it already holds {held} "
                  f"(receiver.max_associations_per_host = {self.limits.per_host})")
        return False

    def dropped(self, request: object) -> None:
        """The server closed an accepted connection without an association."""
        with self._lock:
            self._pending.pop(id(request), None)

    def opened(self, assoc_socket: Any) -> None:
        """pynetdicom made an association of an admitted connection (EVT_CONN_OPEN)."""
        with self._lock:
            peer = self._pending.pop(id(assoc_socket.socket), None)
            if peer is not None:
                self._peers[id(assoc_socket)] = peer

    def closed(self, assoc_socket: Any) -> None:
        with self._lock:
            self._peers.pop(id(assoc_socket), None)

    def held(self, host: str) -> int:
        with self._lock:
            return self._held(host)

    def _held(self, host: str) -> int:
        return sum(p.host == host for p in (*self._pending.values(), *self._peers.values()))

    def _say(self, host: str, message: str) -> None:
        """A refusal, logged at most every 10 s per host (a flood must not flood the log)."""
        now = self.clock()
        with self._lock:
            last = self._said.get(host)
            if last is not None and now - last < 10:
                return
            self._said[host] = now
        log.warning("%s", message)

    # --- reading ---------------------------------------------------------------------------

    def recv(self, assoc_socket: Any, original: Callable[[Any, int], bytearray],
             nr_bytes: int) -> bytearray:
        peer = self._peers.get(id(assoc_socket))
        if peer is None:  # not a connection this guard admitted (our own requestors)
            return original(assoc_socket, nr_bytes)
        if nr_bytes == 6:
            data = self._read(assoc_socket, peer, 6, self._deadline(peer))
            peer.header = bytes(data)
            return data
        header, peer.header = peer.header, b""
        if len(header) != 6:
            raise Refused("the guard lost a PDU header: pynetdicom reads PDUs differently")
        pdu_type, _, length = struct.unpack(">BBL", header)
        limit = self.limits.max_pdu if pdu_type == P_DATA_TF else MAX_SMALL_PDU
        if length != nr_bytes or length > limit:
            self._refuse(peer, f"{PDU_NAMES.get(pdu_type, hex(pdu_type))} of {length} bytes "
                         f"declared, over the {limit} allowed")
        data = self._read(assoc_socket, peer, length, self._deadline(peer))
        if pdu_type == A_ASSOCIATE_RQ:
            peer.negotiated = True
        elif pdu_type == P_DATA_TF:
            self._count_data(peer, data)
        return data

    def _deadline(self, peer: _Peer) -> float:
        if not peer.negotiated:
            return peer.connected + self.limits.negotiation
        return self.clock() + self.limits.request_timeout

    def _read(self, assoc_socket: Any, peer: _Peer, count: int, deadline: float
              ) -> bytearray:
        sock: socket.socket = assoc_socket.socket
        data = bytearray(count)
        view = memoryview(data)
        got = 0
        try:
            while got < count:
                left = deadline - self.clock()
                if left <= 0:
                    what = ("the association request" if not peer.negotiated
                            else f"a PDU ({got} of {count} bytes)")
                    self._refuse(peer, f"{what} did not arrive in time")
                sock.settimeout(min(left, self.limits.idle_timeout))
                read = sock.recv_into(view[got:], min(READ_SIZE, count - got))
                if not read:
                    return data[:got]  # closed: pynetdicom sees a short PDU (Evt17)
                got += read
        finally:
            sock.settimeout(self.limits.idle_timeout)
        return data

    def _count_data(self, peer: _Peer, pdu: bytearray) -> None:
        """Data set bytes of the message in progress: bounded in size and in time."""
        pos = 0
        while pos + 6 <= len(pdu):
            item_length = struct.unpack_from(">L", pdu, pos)[0]
            control = pdu[pos + 5]
            if not control & 0x01:  # a data set fragment, not a command
                if peer.object_started is None:
                    peer.object_started = self.clock()
                peer.object_bytes += max(0, item_length - 2)
                if peer.object_bytes > self.limits.max_object:
                    self._refuse(peer, f"a data set over {self.limits.max_object} bytes "
                                 "(receiver.max_object_mb)")
                elapsed = self.clock() - peer.object_started
                if elapsed > self.limits.request_timeout + peer.object_bytes / RATE_FLOOR:
                    self._refuse(peer, f"a data set coming at {peer.object_bytes / elapsed:.0f} "
                                 f"bytes/s, under the {RATE_FLOOR} bytes/s floor")
                if control & 0x02:  # its last fragment: the next message starts afresh
                    peer.object_bytes, peer.object_started = 0, None
            pos += 4 + item_length

    def _refuse(self, peer: _Peer, why: str) -> None:
        self._say(peer.host, f"connection from {peer.host} closed: {why}")
        raise Refused(why)


_installed: list[Guard] = []
_original_recv: Callable[[Any, int], bytearray] = AssociationSocket.recv


def install(guard: Guard) -> None:
    """Read every admitted connection through `guard` (this process: the receiver's)."""
    _installed[:] = [guard]

    def recv(self: Any, nr_bytes: int) -> bytearray:
        current = _installed[0] if _installed else None
        if current is None:
            return _original_recv(self, nr_bytes)
        return current.recv(self, _original_recv, nr_bytes)

    AssociationSocket.recv = recv


def uninstall() -> None:
    _installed.clear()
    AssociationSocket.recv = _original_recv

"""The limits a hostile peer meets, at unit level (fake sockets and clocks): the embedded
receiver's guard, the DCMTK engine's process warden, the deflate check, the metrics' label
values. The same limits against real peers are in test_hostile_network.py."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Any

import pytest

from relay.edit.scan import inflate_excess
from relay.ops.metrics import INVALID_AE, MAX_CALLING_AES, OTHER_AES, Metrics
from relay.receive.guard import RATE_FLOOR, Guard, Limits, Refused
from relay.receive.warden import Child, to_kill

LIMITS = Limits(max_pdu=16382, negotiation=5.0, request_timeout=10.0, idle_timeout=60.0,
                max_object=1_000_000, per_host=2)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TricklingSocket:
    """A socket that gives `chunk` bytes per recv_into, the clock moving `pause` each time."""

    def __init__(self, data: bytes, clock: Clock, chunk: int = 1 << 20,
                 pause: float = 0.0) -> None:
        self.data, self.clock, self.chunk, self.pause = data, clock, chunk, pause

    def settimeout(self, value: float) -> None:
        pass

    def recv_into(self, view: Any, count: int) -> int:
        self.clock.now += self.pause
        piece = self.data[:min(count, self.chunk)]
        self.data = self.data[len(piece):]
        view[:len(piece)] = piece
        return len(piece)


class Peer:
    """An AssociationSocket stand-in: what the guard reads through."""

    def __init__(self, sock: TricklingSocket) -> None:
        self.socket = sock


def _admitted(guard: Guard, sock: TricklingSocket, host: str = "10.0.0.9") -> Peer:
    peer = Peer(sock)
    assert guard.admit(sock, host)
    guard.opened(peer)
    return peer


def _never(*args: Any) -> bytearray:
    raise AssertionError("the guard reads an admitted connection itself")


def test_a_huge_declared_pdu_is_refused_before_a_byte_of_it_is_read() -> None:
    clock = Clock()
    sock = TricklingSocket(struct.pack(">BBL", 1, 0, 0xFFFFFFF0), clock)
    guard = Guard(LIMITS, clock)
    peer = _admitted(guard, sock)
    header = guard.recv(peer, _never, 6)
    with pytest.raises(Refused, match="A-ASSOCIATE-RQ of 4294967280 bytes"):
        guard.recv(peer, _never, struct.unpack(">BBL", header)[2])


def test_a_p_data_pdu_over_the_announced_maximum_is_refused() -> None:
    clock = Clock()
    guard = Guard(LIMITS, clock)
    rq = struct.pack(">BBL", 1, 0, 10) + bytes(10)
    peer = _admitted(guard, TricklingSocket(rq + struct.pack(">BBL", 4, 0, 16383), clock))
    guard.recv(peer, _never, 6)
    guard.recv(peer, _never, 10)
    guard.recv(peer, _never, 6)
    with pytest.raises(Refused, match="P-DATA-TF of 16383 bytes"):
        guard.recv(peer, _never, 16383)


def test_an_association_request_sent_a_byte_at_a_time_misses_its_deadline() -> None:
    clock = Clock()
    sock = TricklingSocket(struct.pack(">BBL", 1, 0, 400), clock)
    guard = Guard(LIMITS, clock)
    peer = _admitted(guard, sock)
    guard.recv(peer, _never, 6)
    sock.data, sock.chunk, sock.pause = bytes(400), 1, 1.0  # then a byte a second
    with pytest.raises(Refused, match="the association request did not arrive in time"):
        guard.recv(peer, _never, 400)
    assert clock.now - 100 <= LIMITS.negotiation + 1.0, "refused at the deadline"


def _p_data(payload: int, last: bool) -> bytes:
    item = struct.pack(">LBB", payload + 2, 1, 0x02 if last else 0x00) + bytes(payload)
    return struct.pack(">BBL", 4, 0, len(item)) + item


def test_a_data_set_that_trickles_under_the_rate_floor_is_refused() -> None:
    clock = Clock()
    rq = struct.pack(">BBL", 1, 0, 10) + bytes(10)
    # Each 16 KB PDU comes on time (within request_timeout), but at a tenth of the floor.
    pdus = b"".join(_p_data(16000, False) for _ in range(60))
    per_pdu = 16000 / (RATE_FLOOR / 10)
    sock = TricklingSocket(rq, clock)
    guard = Guard(LIMITS, clock)
    peer = _admitted(guard, sock)
    guard.recv(peer, _never, 6)
    guard.recv(peer, _never, 10)
    sock.data, sock.pause = pdus, per_pdu / 2  # two reads a PDU: header, body
    with pytest.raises(Refused, match="under the .* bytes/s floor"):
        for _ in range(60):
            guard.recv(peer, _never, 6)
            guard.recv(peer, _never, 16006)


def test_a_data_set_over_the_size_limit_is_refused_and_a_new_one_starts_afresh() -> None:
    clock = Clock()
    rq = struct.pack(">BBL", 1, 0, 10) + bytes(10)
    small = _p_data(16000, False) * 10 + _p_data(16000, True)  # 176 KB: one object
    big = _p_data(16000, False) * 70  # 1.1 MB, over max_object
    sock = TricklingSocket(rq + small + small + big, clock)
    guard = Guard(LIMITS, clock)
    peer = _admitted(guard, sock)
    guard.recv(peer, _never, 6)
    guard.recv(peer, _never, 10)
    for _ in range(22):  # two objects under the limit: each counted on its own
        guard.recv(peer, _never, 6)
        guard.recv(peer, _never, 16006)
    with pytest.raises(Refused, match="data set over 1000000 bytes"):
        for _ in range(70):
            guard.recv(peer, _never, 6)
            guard.recv(peer, _never, 16006)


def test_a_host_holds_at_most_its_share_until_it_closes_one() -> None:
    guard = Guard(LIMITS, Clock())
    first, second, third = object(), object(), object()
    assert guard.admit(first, "10.0.0.9") and guard.admit(second, "10.0.0.9")
    assert not guard.admit(third, "10.0.0.9"), "a third connection from the same host"
    assert guard.admit(third, "10.0.0.10"), "another host still gets in"
    guard.dropped(first)
    assert guard.admit(object(), "10.0.0.9")


def test_connections_that_are_not_the_guards_are_read_as_pynetdicom_reads_them() -> None:
    calls = []

    def original(sock: Any, count: int) -> bytearray:
        calls.append(count)
        return bytearray(count)

    assert Guard(LIMITS, Clock()).recv(object(), original, 6) == bytearray(6)
    assert calls == [6]


def test_the_warden_picks_slow_negotiators_and_each_hosts_excess() -> None:
    kids = [Child(10, 30.0, "10.0.0.9"), Child(11, 20.0, "10.0.0.9"),
            Child(12, 2.0, "10.0.0.9"), Child(13, 12.0, "10.0.0.7"), Child(14, 1.0, None)]
    negotiated = {10, 11, 12}
    doomed = to_kill(kids, negotiated, negotiation=10, per_host=2, total=10)
    assert set(doomed) == {12, 13}
    assert "10.0.0.9 already holds 2" in doomed[12]
    assert "no association request" in doomed[13]
    assert set(to_kill(kids, negotiated | {13}, negotiation=10, per_host=5, total=3)) == {12, 14}


@pytest.mark.parametrize("kernel_lists_children", [True, False])
def test_the_warden_finds_a_receivers_children_and_their_peers(
        kernel_lists_children: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real processes: two children of this test's process, one of them connected to a
    listening socket here; found by the kernel's list of children where it keeps one, by
    listing /proc where it does not."""
    import socket
    import subprocess
    import sys

    import relay.receive.warden as warden

    if not kernel_lists_children:
        monkeypatch.setattr(warden, "_listed_children", lambda _proc, _parent: None)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    connect = (f"import socket, sys, time; s = socket.create_connection(('127.0.0.1', {port})); "
               "print('up', flush=True); time.sleep(30)")
    talker = subprocess.Popen([sys.executable, "-c", connect], stdout=subprocess.PIPE, text=True)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert talker.stdout is not None and talker.stdout.readline() == "up\n"
        found = {kid.pid: kid for kid in warden.children(os.getpid())}
        assert {talker.pid, sleeper.pid} <= set(found)
        assert found[talker.pid].host == "127.0.0.1"
        assert found[sleeper.pid].host is None
        assert all(0 <= found[pid].age < 30 for pid in (talker.pid, sleeper.pid))
    finally:
        for process in (talker, sleeper):
            process.kill()
            process.wait()
        listener.close()


def _deflated(data: bytes) -> bytes:
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return deflater.compress(data) + deflater.flush()


def test_a_deflate_bomb_is_told_from_a_real_deflated_data_set() -> None:
    bomb = _deflated(bytes(64 * 1024 * 1024))
    assert "deflate bomb" in str(inflate_excess([bomb], 1 << 40))
    assert "over 1000000 bytes" in str(inflate_excess([bomb], 1_000_000))
    header_like = _deflated(b"".join(f"{i:08d} some text that repeats".encode()
                                     for i in range(100_000)))
    assert inflate_excess([header_like], 1 << 30) is None


def test_calling_ae_labels_are_bounded() -> None:
    metrics = Metrics()
    for i in range(MAX_CALLING_AES + 50):
        metrics.received(f"AE{i:03d}", 10)
    metrics.received("BAD\nAE", 10)
    metrics.received("AE000", 10)
    labels = {s.labels["calling_ae"] for family in metrics.registry.collect()
              if family.name == "dicom_relay_received_objects" for s in family.samples
              if s.name.endswith("_total")}
    assert len(labels) == MAX_CALLING_AES + 2
    assert {OTHER_AES, INVALID_AE, "AE000"} <= labels

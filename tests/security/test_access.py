"""Who may send: calling AE titles, hosts, the called AE title; and one stuck peer cannot
block the others. Real peers (DCMTK dcmsend) against `dicom-relay run`."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from dicomdata import ct_series
from peers import (
    ENGINES,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    free_port,
    relay_config,
    spool_objects,
    wait_until,
)

pytestmark = pytest.mark.e2e


def _config(tmp_path: Path, port: int, sink: ScriptedSCP, engine: str = "embedded",
            receiver: str = "") -> Path:
    return relay_config(tmp_path / "relay.toml", port=port, spool=tmp_path / "spool",
                        engine=engine, receiver=receiver,
                        destinations=[("sink", "SCRIPTED", sink.port)])


@pytest.fixture
def sink():  # noqa: ANN201
    scp = ScriptedSCP()
    yield scp
    scp.close()


def test_only_allowed_calling_ae_titles(tmp_path: Path, sink: ScriptedSCP, dcmtk: Path) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    cfg = _config(tmp_path, port, sink, receiver='allowed_calling_aets = ["CT01"]')
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        intruder = ct_series(tmp_path / "intruder", 2)
        allowed = ct_series(tmp_path / "ct", 2)
        refused = dcmsend(sorted((tmp_path / "intruder").iterdir()), port, "DICOMRELAY",
                          calling_aet="INTRUDER")
        assert refused.returncode != 0 and "Rejected" in refused.stderr + refused.stdout
        assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY",
                       calling_aet="CT01").returncode == 0
        wait_until(lambda: set(sink.counts()) == set(allowed), 30,
                   what="the allowed modality's study")
        wait_until(lambda: spool_objects(spool) == [], 30, what="the spool drained")
    finally:
        relay.stop()
    # The intruder's objects were never stored: not in any folder of the spool (after the
    # allowed study went all the way through), not at the destination, not in the audit log.
    assert set(sink.counts()) == set(allowed) and spool_objects(spool) == []
    audit = spool / "audit.jsonl"
    assert not any(uid in audit.read_text() for uid in intruder)


@pytest.mark.parametrize(("allowed", "accepted"), [("10.0.0.0/8", False),
                                                   ("127.0.0.0/8", True)])
def test_only_allowed_hosts(tmp_path: Path, sink: ScriptedSCP, dcmtk: Path, allowed: str,
                            accepted: bool) -> None:
    # Traffic only ever goes to 127.0.0.1: the allow-list decides about that address.
    port = free_port()
    spool = tmp_path / "spool"
    cfg = _config(tmp_path, port, sink, receiver=f'allowed_hosts = ["{allowed}"]')
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        uids = ct_series(tmp_path / "ct", 1)
        result = dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY")
        assert (result.returncode == 0) is accepted
        if accepted:
            wait_until(lambda: set(sink.counts()) == set(uids), 30, what="stored")
        else:
            # Said by the embedded receiver's own process: its lines reach the log a moment
            # after dcmsend has its answer.
            wait_until(lambda: "not in receiver.allowed_hosts" in relay.output(), 20,
                       what="the refusal in the log")
    finally:
        relay.stop()
    if not accepted:  # nowhere, once the relay has stopped (it finishes what it holds)
        assert spool_objects(spool) == [] and sink.counts() == {}
        audit = spool / "audit.jsonl"
        assert not audit.exists() or uids[0] not in audit.read_text()


@pytest.mark.parametrize("key", ["allowed_hosts = [\"127.0.0.1\"]",
                                 "allowed_calling_aets = [\"CT01\"]"])
def test_toolkit_engines_refuse_what_they_cannot_enforce(tmp_path: Path, sink: ScriptedSCP,
                                                        dcmtk: Path, key: str) -> None:
    port = free_port()
    cfg = _config(tmp_path, port, sink, engine="dcmtk", receiver=key)
    relay = RelayProcess(cfg, tmp_path)
    relay.start()
    assert relay.proc is not None
    assert relay.proc.wait(timeout=30) == 1
    assert "cannot enforce it" in relay.output()


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True  # nothing to read, not closed
    except OSError:
        return False


@pytest.mark.parametrize("engine", ENGINES)
def test_a_stuck_peer_does_not_block_the_others(tmp_path: Path, sink: ScriptedSCP, dcmtk: Path,
                                                engine: str) -> None:
    port = free_port()
    relay = RelayProcess(_config(tmp_path, port, sink, engine=engine), tmp_path).start(port)
    stuck = []
    try:
        # Three peers connect and never say a word (or stop half-way through a PDU header).
        for _ in range(3):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"\x01\x00")
            stuck.append(sock)
        uids = ct_series(tmp_path / "ct", 10)
        assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: set(sink.counts()) == set(uids), 30, what="relayed meanwhile")
        # Proof without a stopwatch: the stuck peers are all still connected, so the study
        # did not wait for them to time out.
        for sock in stuck:
            assert _still_open(sock)
    finally:
        for sock in stuck:
            sock.close()
        relay.stop()


@pytest.mark.parametrize("engine", ENGINES)
def test_a_silent_peer_is_disconnected_after_idle_timeout(tmp_path: Path, sink: ScriptedSCP,
                                                          dcmtk: Path, engine: str) -> None:
    port = free_port()
    cfg = _config(tmp_path, port, sink, engine=engine,
                  receiver="idle_timeout = 2\nrequest_timeout = 2")
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(b"\x01\x00")  # the first bytes of an A-ASSOCIATE-RQ, then silence
        # Bounded wait (a guard, not a measurement): the relay hangs up on it.
        wait_until(lambda: not _still_open(sock), 30, interval=0.2, what="the peer dropped")
        sock.close()
    finally:
        relay.stop()


def test_at_most_max_associations_at_once(tmp_path: Path, sink: ScriptedSCP,
                                          dcmtk: Path) -> None:
    # Embedded engine: beyond the limit an association is rejected (transient: try later).
    from pynetdicom import AE

    port = free_port()
    # One host (here all come from 127.0.0.1) may hold them all: the per-host share is
    # tested in test_hostile_network.py.
    relay = RelayProcess(_config(tmp_path, port, sink, receiver="max_associations = 2\n"
                                 "max_associations_per_host = 2"), tmp_path).start()
    # Not probed by a bare TCP connect: that would hold a slot until the ACSE timeout.
    wait_until(lambda: "receiver listening" in relay.output(), 20, what="listening")
    try:
        held = []
        for _ in range(2):
            ae = AE("HOLDER")
            ae.add_requested_context("1.2.840.10008.1.1")
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRELAY")
            assert assoc.is_established
            held.append(assoc)
        extra = AE("EXTRA")
        extra.add_requested_context("1.2.840.10008.1.1")
        refused = extra.associate("127.0.0.1", port, ae_title="DICOMRELAY")
        assert refused.is_rejected
        for assoc in held:
            assoc.release()
    finally:
        relay.stop()

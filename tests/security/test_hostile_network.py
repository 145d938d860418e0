"""A hostile network, as an attacker on the hospital network would play it (issue 23): raw
sockets and crafted pynetdicom associations against each engine on 127.0.0.1, asserting what
must hold. Attackers connect from 127.0.0.2 (Linux routes all of 127/8 to the loopback), the
modality from 127.0.0.1, so that the relay can tell them apart as it would tell two hosts."""

from __future__ import annotations

import os
import socket
import stat
import struct
import threading
import time
import urllib.request
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomdata import bundled, ct_series
from peers import (
    ENGINES,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    dcmsend_statuses,
    free_port,
    proc_stats,
    relay_config,
    spool_files,
    wait_until,
)

pytestmark = pytest.mark.e2e
ATTACKER = "127.0.0.2"
MB = 1024 * 1024


def _pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def _connect(port: int, source: str = ATTACKER) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))


def _flood(port: int, declared: int, up_to: int) -> int:
    """An A-ASSOCIATE-RQ that declares `declared` bytes, then zeros as fast as the relay takes
    them, up to `up_to`: how many bytes it took before it closed the connection."""
    sock = _connect(port)
    sent = 0
    block = bytes(MB)
    try:
        sock.sendall(_pdu_header(0x01, declared))
        while sent < up_to:
            sock.sendall(block)
            sent += len(block)
    except OSError:
        pass
    finally:
        sock.close()
    return sent


class SlowPeer:
    """A connection that sends a PDU header, then one byte a second, for as long as the
    relay keeps it: the trickle that outlives socket timeouts."""

    def __init__(self, port: int, declared: int = 400) -> None:
        self.sock = _connect(port)
        self.sock.sendall(_pdu_header(0x01, declared))
        self.closed = threading.Event()
        threading.Thread(target=self._trickle, args=(declared,), daemon=True).start()

    def _trickle(self, declared: int) -> None:
        try:
            for _ in range(declared):
                self.sock.sendall(b"\x00")
                self.sock.settimeout(1.0)
                try:
                    if self.sock.recv(64) == b"":
                        break
                except TimeoutError:
                    continue
        except OSError:
            pass
        self.closed.set()

    def close(self) -> None:
        self.sock.close()


def _receiver_processes(relay: RelayProcess, name: str) -> int:
    """Live processes named `name` in the relay's process tree."""
    assert relay.proc is not None
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # ended, not yet reaped by its parent
            parents = []
            pid = int(entry.name)
            while pid > 1:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                pid = int(fields[1])
                parents.append(pid)
        except OSError:
            continue
        if comm == name and relay.proc.pid in parents:
            count += 1
    return count


@pytest.mark.parametrize("engine", ENGINES)
def test_a_huge_declared_pdu_is_dropped_before_it_is_buffered(tmp_path: Path, dcmtk: Path,
                                                               engine: str) -> None:
    """pynetdicom buffered a 4 GB A-ASSOCIATE-RQ (800 MB sent: 1.7 GB of RSS), also from a
    host allowed_hosts excludes. Every engine now drops the connection at the header."""
    sink = ScriptedSCP()
    port = free_port()
    receiver = 'allowed_hosts = ["127.0.0.1"]' if engine == "embedded" else ""
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=tmp_path / "spool",
                       engine=engine, destinations=[("sink", "SCRIPTED", sink.port)],
                       receiver=receiver)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        time.sleep(1)  # the receiver process (embedded: a child) is up and settled
        assert relay.proc is not None
        before = proc_stats(relay.proc.pid)[0]
        taken = _flood(port, 0xFFFFFFF0, 400 * MB)
        after = proc_stats(relay.proc.pid)[0]
        assert taken < 64 * MB, f"the relay took {taken / MB:.0f} MB of a declared 4 GB PDU"
        assert after - before < 64, f"the relay's processes grew by {after - before:.0f} MB"
        # The relay goes on serving modalities.
        uids = ct_series(tmp_path / "ct", 2)
        dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY")
        wait_until(lambda: set(sink.counts()) == set(uids), 30, what="the study at the sink")
    finally:
        relay.stop()
        sink.close()
    if engine == "embedded":
        assert "A-ASSOCIATE-RQ of 4294967280 bytes declared" in relay.log_path.read_text()


@pytest.mark.parametrize("engine", ENGINES)
def test_slow_connections_do_not_lock_a_modality_out(tmp_path: Path, dcmtk: Path,
                                                     engine: str) -> None:
    """Ten connections that send a header and then a byte every few seconds held every slot
    of the embedded receiver (each byte reset its timeout); DCMTK's storescp forked a
    process for each, without limit. Now a host holds at most max_associations - 2, each
    association request must be complete within its deadline, and the DCMTK engine's
    processes are counted and capped."""
    sink = ScriptedSCP()
    port = free_port()
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=tmp_path / "spool",
                       engine=engine, destinations=[("sink", "SCRIPTED", sink.port)],
                       receiver="max_associations = 4\nidle_timeout = 10")
    relay = RelayProcess(cfg, tmp_path).start(port)
    attackers: list[SlowPeer] = []
    try:
        attackers = [SlowPeer(port) for _ in range(10)]
        time.sleep(1.5)  # the relay sees them all
        if engine == "dcmtk":
            assert _receiver_processes(relay, "storescp") <= 1 + 4, \
                "storescp's processes are capped at max_associations"
        uids = ct_series(tmp_path / "ct", 3)
        report = tmp_path / "report.txt"
        dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY", report=report)
        holding = sum(not a.closed.is_set() for a in attackers)
        statuses = dcmsend_statuses(report)
        assert len(statuses) == 3 and all(s.startswith("0x0000") for s in statuses.values()), \
            statuses
        assert holding >= 1, "the modality got in while slow peers still held connections"
        if engine != "dcm4che":  # dcm4che's storescp has no cap to take
            assert holding <= 2, "one host holds at most max_associations - 2"
        wait_until(lambda: set(sink.counts()) == set(uids), 30, what="the study at the sink")
        # The association request had to be complete within min(10, idle_timeout / 2).
        wait_until(lambda: all(a.closed.is_set() for a in attackers), 30,
                   what="every slow peer dropped at its negotiation deadline")
    finally:
        for attacker in attackers:
            attacker.close()
        relay.stop()
        sink.close()


def _deflate_bomb(path: Path, inflated: int) -> str:
    """A Secondary Capture in Deflated Explicit VR Little Endian whose pixel data inflate to
    `inflated` bytes of zeros (the file is about a thousandth of that)."""
    uid = "1.2.826.0.1.3680043.10.543.66"
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = uid + ".1"
    ds.SeriesInstanceUID = uid + ".2"
    ds.PatientID = "BOMB"
    ds.Modality = "OT"
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    write_file_meta_info(head, meta, enforce_standard=True)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    with open(path, "wb") as out:
        out.write(b"\x00" * 128 + b"DICM" + head.getvalue())
        out.write(deflater.compress(body.getvalue()))
        out.write(deflater.compress(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, inflated)))
        block = bytes(16 * MB)
        for _ in range(inflated // len(block)):
            out.write(deflater.compress(block))
        out.write(deflater.flush())
        if out.tell() % 2:
            out.write(b"\x00")  # a deflated stream is padded to an even length (PS3.5 A.5)
    return uid


def _send_file(path: Path, port: int, syntax: str) -> int | None:
    """C-STORE one file as its bytes are (pynetdicom, chunked: never decoded): the status,
    or None without a response."""
    from pynetdicom import AE

    import relay.toolkits.embedded  # noqa: F401 - sets pynetdicom's chunked sending

    ae = AE("ATTACKER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7", syntax)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRELAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("bomb") / "bomb.dcm"
    return path, _deflate_bomb(path, 1024 * MB)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_deflate_bomb_is_refused_and_never_forwarded(
        tmp_path: Path, dcmtk: Path, engine: str, bomb: tuple[Path, str]) -> None:
    """1 MB that inflate to 1 GB: acknowledged and inflated in memory before (2.1 GB), then
    forwarded. The embedded receiver refuses it (0xC000); the toolkits' storescp acknowledge
    what they stream to disk, and the relay quarantines it as too large, unforwarded."""
    bomb_file, uid = bomb
    assert bomb_file.stat().st_size < 2 * MB
    sink = ScriptedSCP()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("sink", "SCRIPTED", sink.port)])
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        time.sleep(1)
        assert relay.proc is not None
        before = proc_stats(relay.proc.pid)[0]
        status = _send_file(bomb_file, port, DeflatedExplicitVRLittleEndian)
        if engine == "embedded":
            assert status == 0xC000
        else:
            assert status == 0x0000
            wait_until(lambda: spool_files(spool, "failed/too-large"), 60,
                       what="the bomb quarantined")
            [sidecar] = (spool / "failed" / "too-large").glob("*.json")
            assert "deflate bomb" in sidecar.read_text()
        after = proc_stats(relay.proc.pid)[0]
        assert after - before < 200, f"the relay's processes grew by {after - before:.0f} MB"
        uids = ct_series(tmp_path / "ct", 2)
        dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY")
        wait_until(lambda: set(sink.counts()) == set(uids), 30, what="the relay goes on")
        assert uid not in sink.counts()
    finally:
        relay.stop()
        sink.close()


# UIDs a peer may send: a newline and tabs that made dcm4che's storescu read a forged line of
# its file list (and send relay.toml from the relay's working directory), a space that it
# could not match in the answer, and names that hid the object (.hidden) or made it look
# unfinished (.part).
ODD_UIDS = ["1.2.3.7\n9.9.9\t1.2.840.10008.5.1.4.1.1.2\t1.2.840.10008.1.2.1\t0\trelay.toml",
            "1.2.3.8 9", ".hidden", "1.2.3.part"]


def _odd_object(folder: Path, index: int, uid: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(bundled("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.InstanceNumber = index + 1
    path = folder / f"odd{index}.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=False)
    return path


def _store_odd(path: Path, port: int, monkeypatch: pytest.MonkeyPatch) -> int | None:
    """C-STORE an object whose SOP Instance UID is no UID: pynetdicom refuses to send one
    unless its UID validator is replaced, as an attacker would."""
    from pynetdicom import AE, _config

    monkeypatch.setitem(_config.VALIDATORS, "UI", lambda value: (True, ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
    ae = AE("MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRELAY")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
        return int(status.Status) if "Status" in status else None
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.mark.parametrize("engine", ENGINES)
def test_odd_uids_are_forwarded_and_nothing_else_is(
        tmp_path: Path, dcmtk: Path, engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An object whose SOP Instance UID is not a UID is forwarded, once, when the receiver
    acknowledged it (DCMTK's storescp refuses some: it aborts the association, nothing is
    acknowledged); no file of the relay's working directory ever reaches the PACS (a
    capturing sink compares every data set it got with what was sent); nothing acknowledged
    is left unseen in a folder, or quarantined at the next start."""
    workdir = tmp_path / "workdir"  # the relay's working directory, with relay.toml in it
    workdir.mkdir()
    kept = tmp_path / "kept"
    kept.mkdir()
    sink = ScriptedSCP(keep_files=kept)
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(workdir / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("sink", "SCRIPTED", sink.port)])
    relay = RelayProcess(cfg, tmp_path, cwd=workdir).start(port)
    acknowledged = []
    try:
        for i, uid in enumerate(ODD_UIDS):
            if _store_odd(_odd_object(tmp_path, i, uid), port, monkeypatch) == 0x0000:
                acknowledged.append(uid)
        if engine != "dcmtk":
            assert acknowledged == ODD_UIDS
        assert acknowledged, "some odd UIDs get through every receiver"
        wait_until(lambda: len(sink.kept) >= len(acknowledged), 60,
                   what="every acknowledged object at the sink")
        wait_until(lambda: not spool_files(spool, "out") and not spool_files(spool, "incoming"),
                   30, what="nothing left queued or unseen")
        time.sleep(2)  # a resend, if its answer were not matched, would come now
    finally:
        relay.stop()
        sink.close()
    config_bytes = cfg.read_bytes()
    forwarded = []
    for _, path in sink.kept:
        assert config_bytes not in path.read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=True)
        assert ds.Modality == "CT"
        forwarded.append(str(ds.SOPInstanceUID))
    if engine == "dcmtk":
        # DCMTK's tools take the spaces out of a UID they store or send: the object goes as
        # DCMTK makes it.
        acknowledged = [uid.replace(" ", "") for uid in acknowledged]
    assert sorted(forwarded) == sorted(acknowledged), "each acknowledged object once, and " \
        "nothing else"
    # A restart finds nothing half-received: what was acknowledged was whole.
    relay = RelayProcess(cfg, tmp_path, cwd=workdir).start(port)
    relay.stop()
    assert not (spool / "failed").exists() or not any((spool / "failed").rglob("*.dcm*"))


@pytest.mark.parametrize("engine", ENGINES)
def test_objects_are_private_on_every_engine(tmp_path: Path, dcmtk: Path, engine: str) -> None:
    """The README promises 0600: the toolkits' storescp wrote 0644."""
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("down", "NOBODY", free_port())],
                       rules='[[rules]]\nset = "InstitutionName"\nvalue = "X"\n')
    ct_series(tmp_path / "ct", 3)
    old = os.umask(0o022)
    try:
        relay = RelayProcess(cfg, tmp_path).start(port)
    finally:
        os.umask(old)
    try:
        dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY")
        wait_until(lambda: len(spool_files(spool, "out/down")) == 3, 30, what="queued")
    finally:
        relay.stop()
    files = [p for p in spool.rglob("*") if p.is_file()]
    assert files
    loose = {str(p.relative_to(spool)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) & 0o077}
    assert loose == {}


def test_the_metrics_endpoint_survives_unfinished_requests(tmp_path: Path, dcmtk: Path
                                                            ) -> None:
    """400 unfinished requests held 409 threads for 30 s and more, and at 1021 the pipeline
    could not open files. Now requests time out and at most a few are served at once."""
    sink = ScriptedSCP()
    port, metrics_port = free_port(), free_port()
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=tmp_path / "spool",
                       destinations=[("sink", "SCRIPTED", sink.port)],
                       extra=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    relay = RelayProcess(cfg, tmp_path).start(port)
    sockets = []
    try:
        wait_until(lambda: _answers(metrics_port), 20, what="metrics served")

        def unfinished_request() -> socket.socket:
            sock = socket.create_connection(("127.0.0.1", metrics_port), timeout=5)
            sock.sendall(b"GET /metr")
            return sock

        # Opened 20 at a time: on these machines a loopback connect now and then waits out
        # a 1 s SYN retry while many connections are open, and one by one the 400 took 40 s.
        with ThreadPoolExecutor(20) as pool:
            sockets.extend(pool.map(lambda _: unfinished_request(), range(400)))
        assert relay.proc is not None
        threads = int(next(line.split()[1] for line in
                           Path(f"/proc/{relay.proc.pid}/status").read_text().splitlines()
                           if line.startswith("Threads:")))
        assert threads < 60, f"{threads} threads in the relay"
        uids = ct_series(tmp_path / "ct", 3)
        dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY")
        wait_until(lambda: set(sink.counts()) == set(uids), 30, what="relaying goes on")
        wait_until(lambda: _answers(metrics_port), 30, what="metrics served again")
    finally:
        for sock in sockets:
            sock.close()
        relay.stop()
        sink.close()


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as answer:
            return b"dicom_relay_received_objects" in answer.read()
    except OSError:
        return False

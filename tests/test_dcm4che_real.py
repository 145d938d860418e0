"""The dcm4che engine against the real dcm4che tools (peers.find_dcm4che: DCM4CHE_HOME,
/opt/dcm4che-toolkit, or in CI the real 5.24.0 toolkit in ../shared). Skipped, saying why,
where no toolkit exists. The suites shared with the other engines (faults, bad input, TLS,
fidelity, kill -9) run dcm4che through peers.ENGINES; this file has what is dcm4che's own."""

from __future__ import annotations

import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import bundled, copy_with_new_uids, ct_series, mixed_study
from peers import (
    DCM4CHE_HOME,
    DCMTK_BIN,
    ENGINES,
    NO_DCM4CHE,
    Dcm4cheStoreSCP,
    Orthanc,
    RelayProcess,
    ScriptedSCP,
    dcm4che_storescu,
    dcmsend,
    dcmtk_env,
    free_port,
    relay_config,
    spool_files,
    wait_for_port,
    wait_until,
)
from relay.config.model import Destination, SenderConfig
from relay.send.results import Outcome, ToolFailure
from relay.send.sender import DestinationSender
from relay.spool import Spool
from relay.toolkits.dcm4che import Dcm4cheEngine, java_library_path

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(DCM4CHE_HOME is None, reason=NO_DCM4CHE)]


@pytest.fixture
def engine() -> Dcm4cheEngine:
    if shutil.which("java") is None:  # tests/run installs a Java runtime
        pytest.fail("java is not installed: run the suite with tests/run")
    assert DCM4CHE_HOME is not None
    return Dcm4cheEngine(DCM4CHE_HOME)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def _relay(tmp_path: Path, orthanc: Orthanc, converter: str = "embedded",
           engine: str = "dcm4che") -> tuple[int, Path, RelayProcess]:
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       converter=converter, destinations=[("central", orthanc.aet,
                                                           orthanc.dicom_port)],
                       rules='[[rules]]\nset = "PatientID"\ncopy_from = "EthnicGroup"\n')
    return port, spool, RelayProcess(cfg, tmp_path).start(port)


@pytest.mark.parametrize("converter", ["embedded", "toolkit"])
def test_dcm4che_relay_end_to_end(tmp_path: Path, orthanc: Orthanc, dcmtk: Path,
                                  converter: str) -> None:
    assert DCM4CHE_HOME is not None
    before = _tree(DCM4CHE_HOME)
    port, spool, relay = _relay(tmp_path, orthanc, converter)
    try:
        sent = mixed_study(tmp_path / "study")
        assert dcmsend(sorted((tmp_path / "study").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: orthanc.count() == len(sent), 120, what="all at Orthanc")
        tags = orthanc.tags_by_sop_uid()
        for uid, info in sent.items():
            assert tags[uid]["PatientID"] == info["ethnic_group"]
        wait_until(lambda: spool_files(spool, "out") == [], 30, what="spool drained")
    finally:
        assert relay.stop() == 0
    log = relay.output()
    # storescp's INFO lines stay: associations and objects stored...
    assert "storescp: " in log and "A-ASSOCIATE-RQ" in log and "M-RENAME" in log
    # ...its per-PDU DEBUG dumps and per-message lines do not reach our INFO log.
    assert "enter state: Sta" not in log and "Dataset sending" not in log
    assert "C-STORE-RQ" not in log and "M-WRITE" not in log
    lines = sum("storescp: " in line for line in log.splitlines())
    print(f"\n{lines} lines of storescp at INFO for {len(sent)} objects")
    assert "Try to download" not in log and "OpenCV" not in log
    assert _tree(DCM4CHE_HOME) == before, "something was written into the toolkit's folder"


def test_each_tool_call_starts_one_jvm(tmp_path: Path, engine: Dcm4cheEngine) -> None:
    # A java that counts its starts, then runs the real one: the launcher must not start a
    # first JVM to name the platform (it does without JAVA_LIBRARY_PATH).
    real_java = Path(shutil.which("java") or "java").resolve()
    fake_home = tmp_path / "jdk"
    (fake_home / "bin").mkdir(parents=True)
    counter = tmp_path / "starts"
    java = fake_home / "bin" / "java"
    java.write_text(f'#!/bin/sh\necho start >> "{counter}"\nexec "{real_java}" "$@"\n')
    java.chmod(0o755)
    engine.env["JAVA_HOME"] = str(fake_home)
    pacs = ScriptedSCP()
    try:
        dest = Destination("scp", "SCRIPTED", "127.0.0.1", pacs.port)
        engine.echo(dest, "DICOMRELAY", 20)
        assert counter.read_text().count("start") == 1
        ct = tmp_path / "ct"
        ct_series(ct, 2)
        results = list(engine.send(sorted(ct.iterdir()), dest, "DICOMRELAY", 20))
        assert [r.outcome for r in results] == [Outcome.DELIVERED] * 2
        assert counter.read_text().count("start") == 2
    finally:
        pacs.close()
    assert engine.env["JAVA_LIBRARY_PATH"] == str(java_library_path(DCM4CHE_HOME))


def test_a_tool_that_fails_on_its_own_is_a_local_failure(
        tmp_path: Path, engine: Dcm4cheEngine) -> None:
    engine.env["JAVA_HOME"] = str(tmp_path / "no-such-jdk")  # the launcher finds no java
    pacs = ScriptedSCP()
    try:
        dest = Destination("scp", "SCRIPTED", "127.0.0.1", pacs.port)
        with pytest.raises(ToolFailure, match=r"local tool failure.*exit 127.*java: not found"):
            engine.echo(dest, "DICOMRELAY", 10)
        ct = tmp_path / "ct"
        ct_series(ct, 2)
        results = list(engine.send(sorted(ct.iterdir()), dest, "DICOMRELAY", 10))
        assert all(r.outcome is Outcome.RETRY and r.local_failure for r in results)
        assert "java: not found" in results[0].detail
        assert pacs.received == []
    finally:
        pacs.close()


def test_a_refused_connection_is_the_destination_not_the_tool(
        tmp_path: Path, engine: Dcm4cheEngine) -> None:
    dest = Destination("down", "NOBODY", "127.0.0.1", free_port())
    ct = tmp_path / "ct"
    ct_series(ct, 1)
    [result] = engine.send(sorted(ct.iterdir()), dest, "DICOMRELAY", 10)
    assert result.outcome is Outcome.RETRY and not result.local_failure
    assert "Connection refused" in result.detail
    with pytest.raises(Exception, match="Connection refused") as info:
        engine.echo(dest, "DICOMRELAY", 10)
    assert not isinstance(info.value, ToolFailure)


def _unreadable_and_unknown(folder: Path) -> tuple[Path, Path]:
    """A file storescu cannot scan (cut after its header) and one of a SOP class no
    destination accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    cut = folder / "cut.dcm"
    copy_with_new_uids(bundled("CT_small.dcm"), cut)
    cut.write_bytes(cut.read_bytes()[:600])  # in the data set header, after the file meta
    unknown = folder / "unknown-class.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copy_with_new_uids(bundled("MR_small.dcm"), unknown)
        ds = dcmread(unknown)
    ds.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.999"
    ds.SOPClassUID = "1.2.826.0.1.3680043.8.498.999"
    ds.save_as(unknown)
    return cut, unknown


def test_objects_storescu_cannot_send_fail_alone(tmp_path: Path, engine: Dcm4cheEngine) -> None:
    folder = tmp_path / "batch"
    good = folder / "good"
    uids = ct_series(good, 2)
    cut, unknown = _unreadable_and_unknown(folder)
    files = [sorted(good.iterdir())[0], cut, unknown, sorted(good.iterdir())[1]]
    pacs = ScriptedSCP()
    try:
        dest = Destination("scp", "SCRIPTED", "127.0.0.1", pacs.port)
        results = {r.path: r for r in engine.send(files, dest, "DICOMRELAY", 20)}
    finally:
        pacs.close()
    assert sorted(pacs.received) == sorted(uids)
    assert results[cut].outcome is Outcome.FAILED
    assert "storescu cannot read it: java.io.EOFException" in results[cut].detail
    assert results[unknown].outcome is Outcome.FAILED
    assert "no presentation context for SOP class 1.2.826.0.1.3680043.8.498.999" in \
        results[unknown].detail


def test_an_object_that_kills_the_tool_is_set_aside_and_then_quarantined(
        tmp_path: Path, engine: Dcm4cheEngine, dcmtk: Path) -> None:
    # DCMTK's storescp without +xa accepts only uncompressed syntaxes; for a JPEG 2000 object
    # dcm4che's storescu then decompresses, which needs its OpenCV library. Without it (the
    # toolkit in ../shared) the JVM dies mid-object: that object is the one in flight, the
    # others go on, and after three such breaks it is quarantined, never retried for ever.
    # With OpenCV (the official distribution) it is decompressed and stored.
    has_opencv = (java_library_path(engine.home) / "libopencv_java.so").exists()
    sink = tmp_path / "sink"
    sink.mkdir()
    port = free_port()
    storescp = subprocess.Popen([str(DCMTK_BIN / "storescp"), "-od", str(sink), str(port)],
                                env=dcmtk_env())
    spool = Spool(tmp_path / "spool", ["sink"]).create()
    try:
        wait_for_port(port, proc=storescp)
        dest = Destination("sink", "ANY", "127.0.0.1", port)
        outbox = spool.outbox("sink")
        ct_series(tmp_path / "ct", 3)
        for i, f in enumerate(sorted((tmp_path / "ct").iterdir())):
            shutil.copy(f, outbox / f"{i}-ct.dcm")
        copy_with_new_uids(bundled("JPEG2000.dcm"), outbox / "1-j2k.dcm")
        sender = DestinationSender(spool, dest, engine, SenderConfig(
            batch_size=10, retry_initial=0.05, retry_max=0.1, timeout=20))
        sender.load_backlog()
        for _ in range(10):
            if not sender.pending():
                break
            batch = sender._next_batch(idle_limit=1.0)
            if batch:
                sender.send_batch(batch)
    finally:
        storescp.terminate()
        storescp.wait(timeout=10)
    assert sender.pending() == 0
    assert len(list(sink.iterdir())) == (4 if has_opencv else 3)
    quarantined = [p for p in spool_files(spool.root, "failed") if p.suffix != ".json"]
    if has_opencv:
        assert quarantined == []
    else:
        assert [p.name for p in quarantined] == ["sink--1-j2k.dcm"]
        [sidecar] = [p for p in spool_files(spool.root, "failed") if p.suffix == ".json"]
        assert "the association broke 3 times" in sidecar.read_text()
        assert "opencv" in sidecar.read_text().lower()


@pytest.mark.parametrize("engine_name", ENGINES)
def test_dcm4che_tools_as_modality_and_as_pacs(tmp_path: Path, engine_name: str) -> None:
    # dcm4che's storescu is the modality, dcm4che's storescp the destination PACS; the relay
    # between them runs each engine.
    pacs = Dcm4cheStoreSCP(tmp_path / "pacs")
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine_name,
                       destinations=[("pacs", pacs.aet, pacs.port)],
                       rules='[[rules]]\nset = "PatientID"\ncopy_from = "EthnicGroup"\n')
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        sent = mixed_study(tmp_path / "study")
        proc = dcm4che_storescu(sorted((tmp_path / "study").iterdir()), port, "DICOMRELAY")
        assert proc.stdout.count("C-STORE-RSP[") == len(sent), proc.stdout[-2000:]
        assert "ERROR" not in proc.stderr, proc.stderr
        wait_until(lambda: len(pacs.stored()) == len(sent), 120, what="all at dcm4che's storescp")
        wait_until(lambda: spool_files(spool, "out") == [], 30, what="spool drained")
    finally:
        assert relay.stop() == 0
        pacs.close()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = {str(ds.SOPInstanceUID): ds for ds in
               (dcmread(p, stop_before_pixels=True) for p in pacs.stored())}
    assert set(got) == set(sent)
    for uid, info in sent.items():
        assert got[uid].PatientID == info["ethnic_group"]
    assert os.path.exists(spool / "failed") and spool_files(spool, "failed") == []

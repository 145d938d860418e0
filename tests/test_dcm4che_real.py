"""The dcm4che engine against the real dcm4che tools (peers.find_dcm4che: DCM4CHE_HOME,
/opt/dcm4che-toolkit, or in CI the real 5.24.0 toolkit in ../shared). Skipped, saying why,
where no toolkit exists. The suites shared with the other engines (faults, bad input, TLS,
fidelity, kill -9) run dcm4che through peers.ENGINES; this file has what is dcm4che's own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread

from dicomdata import bundled, copy_with_new_uids, ct_series, mixed_study, readable_bundled_files
from peers import (
    DCM4CHE_HOME,
    ENGINES,
    NO_DCM4CHE,
    Dcm4cheStoreSCP,
    Orthanc,
    RelayProcess,
    ScriptedSCP,
    dcm4che_storescu,
    dcmsend,
    descendants,
    free_port,
    halted_within,
    relay_config,
    send_past_a_poison_object,
    spool_files,
    wait_until,
)
from relay.config.model import Destination
from relay.edit.editor import BadInput, Editor
from relay.edit.rules import KeywordRule
from relay.send.results import Outcome, ToolFailure
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
        # Its JVM is started with the relay, not on the first object's time.
        wait_until(lambda: "dcm4che's JVM is up" in relay.output(), 60, what="the JVM up")
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


def test_one_jvm_for_every_send_echo_and_conversion(tmp_path: Path,
                                                   engine: Dcm4cheEngine) -> None:
    # The helper's JVM starts once and serves everything; a batch after a pause uses the
    # association the last one kept (keep_open), and release() ends it.
    pacs = ScriptedSCP()
    try:
        dest = Destination("scp", "SCRIPTED", "127.0.0.1", pacs.port)
        engine.echo(dest, "DICOMRELAY", 20)
        pid = engine.jvm.pid
        ct = tmp_path / "ct"
        ct_series(ct, 4)
        files = sorted(ct.iterdir())
        first = list(engine.send(files[:2], dest, "DICOMRELAY", 20, keep_open=True))
        second = list(engine.send(files[2:], dest, "DICOMRELAY", 20, keep_open=True))
        engine.release(dest)
        root = engine.to_xml(files[0])
        engine.from_xml(root, files[0], tmp_path / "converted.dcm")
        assert [r.outcome for r in first + second] == [Outcome.DELIVERED] * 4
        assert len(set(pacs.associations.values())) == 1, "one association for both batches"
        assert engine.jvm.starts == 1 and engine.jvm.pid == pid is not None
    finally:
        pacs.close()
    assert engine.env["JAVA_LIBRARY_PATH"] == str(java_library_path(DCM4CHE_HOME))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm to every process"])
def test_a_stop_signal_to_every_process_stops_the_relay_not_its_jvm(
        tmp_path: Path, how: str) -> None:
    """Ctrl-C in the relay's terminal (SIGINT to its process group), or SIGTERM to every
    process of the service (systemd's default KillMode): the relay stops cleanly, and the
    helper JVM is not killed under it (it printed a KeyboardInterrupt, or the JVM's own
    handler aborted it, and the relay logged 'JVM exited' at each stop)."""
    port = free_port()
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=tmp_path / "spool",
                       engine="dcm4che", destinations=[("sink", "SINK", free_port())])
    log = tmp_path / "relay.log"
    with open(log, "wb") as out:
        relay = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(cfg)],
                                 stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "dcm4che's JVM is up" in log.read_text(), 60, what="the JVM")
        wait_until(lambda: "running (receive + process+send)" in log.read_text(), 60,
                   what="the relay running")
        if how == "ctrl-c":
            os.killpg(relay.pid, signal.SIGINT)
        else:  # every process of the relay's tree at once, as systemd's cgroup kill does
            for pid in [relay.pid, *descendants(relay.pid)]:
                os.kill(pid, signal.SIGTERM)
        assert relay.wait(60) == 0
    finally:
        if relay.poll() is None:
            relay.kill()
    text = log.read_text()
    assert "INFO relay: stopped" in text
    assert "JVM exited" not in text and "KeyboardInterrupt" not in text, text[-3000:]


def test_a_missing_java_is_a_local_failure(tmp_path: Path, engine: Dcm4cheEngine) -> None:
    engine.env["JAVA_HOME"] = str(tmp_path / "no-such-jdk")  # no JVM to start
    pacs = ScriptedSCP()
    try:
        dest = Destination("scp", "SCRIPTED", "127.0.0.1", pacs.port)
        with pytest.raises(ToolFailure, match=r"local tool failure.*java: not found"):
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


def test_objects_dcm4che_cannot_send_fail_alone(tmp_path: Path, engine: Dcm4cheEngine,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "batch"
    good = folder / "good"
    uids = ct_series(good, 2)
    cut, unknown = _unreadable_and_unknown(folder)
    files = [sorted(good.iterdir())[0], cut, unknown, sorted(good.iterdir())[1]]
    answers: list[dict[str, Any]] = []
    call = engine.jvm.call

    def recorded(request: dict[str, Any], **options: Any) -> Iterator[dict[str, Any]]:
        for answer in call(request, **options):
            answers.append(answer)
            yield answer

    monkeypatch.setattr(engine.jvm, "call", recorded)
    pacs = ScriptedSCP()
    try:
        dest = Destination("scp", "SCRIPTED", "127.0.0.1", pacs.port)
        results = {r.path: r for r in engine.send(files, dest, "DICOMRELAY", 20)}
    finally:
        pacs.close()
    # The JVM names each file before it reads it: had the cut file crashed or hung the JVM,
    # it would be the one in hand (set aside), not a death with nothing sent.
    assert [(a["ev"], a.get("i"), "unreadable" in a) for a in answers[:4]] == [
        ("sending", 0, False), ("result", 0, False), ("sending", 1, False),
        ("result", 1, True)]
    assert sorted(pacs.received) == sorted(uids)
    assert results[cut].outcome is Outcome.FAILED
    assert "dcm4che cannot read it: java.io.EOFException" in results[cut].detail
    assert results[unknown].outcome is Outcome.FAILED
    assert "no presentation context for SOP class 1.2.826.0.1.3680043.8.498.999" in \
        results[unknown].detail


class JvmBreakingSCP(ScriptedSCP):
    """A PACS at whose C-STORE of one instance the relay's JVM helper is killed (SIGKILL:
    a crash) or stopped (SIGSTOP: a hang), while that object is on the wire."""

    def __init__(self, engine: Dcm4cheEngine, victim: str, sig: int, times: int) -> None:
        super().__init__()
        self.engine, self.victim, self.sig, self.times = engine, victim, sig, times

    def on_store(self, event: Any) -> int:
        pid = self.engine.jvm.pid
        if str(event.request.AffectedSOPInstanceUID) == self.victim and self.times > 0 \
                and pid is not None:
            self.times -= 1
            os.kill(pid, self.sig)
            # A signal to a process takes a moment to reach each of its threads: until then
            # the JVM could still read this response (measured: about 1 run in 10) and be
            # stopped between objects, with nothing on the wire. Answer once it cannot.
            assert halted_within(pid, 10), f"the JVM (pid {pid}) did not stop"
            return 0xA700  # a crashed JVM never reads it; a hung one is killed first
        return super().on_store(event)


@pytest.mark.parametrize("how", ["crash", "hang"])
def test_a_jvm_that_dies_or_hangs_mid_object_is_restarted(
        tmp_path: Path, engine: Dcm4cheEngine, how: str) -> None:
    # The JVM crashes (or hangs) with one object on the wire, three times in a row: the
    # others are all delivered, that one is set aside each time and then quarantined, the
    # helper is started again every time, and nothing is lost.
    sig = signal.SIGKILL if how == "crash" else signal.SIGSTOP
    # timeout 2 s: a helper silent for 3 x 2 s is taken for hung and killed.
    run = send_past_a_poison_object(
        tmp_path, engine, lambda victim: JvmBreakingSCP(engine, victim, sig, times=3), 2)
    assert run.sender.pending() == 0
    assert run.received == run.others
    assert run.quarantined == ["pacs--1-ct.dcm"]
    assert "the association broke 3 times" in run.sidecar
    assert ("killed by signal 9" if how == "crash" else "hung: no answer for 6 s") in run.sidecar
    # The first, and one for each try after a break (the third break quarantines it: no more).
    assert engine.jvm.starts == 3 and engine.jvm.pid is None


def test_converter_toolkit_matches_the_embedded_converter_on_every_bundled_file(
        tmp_path: Path, engine: Dcm4cheEngine) -> None:
    # Every bundled file edited by both converters with the same rules: the two outputs hold
    # the same data set, but for what dcm4che itself does when it writes a file: an element
    # stored as UN gets the VR of dcm4che's private dictionary (pydicom reads it with its
    # own), and two files dcm4che cannot parse are refused, with the reason, for quarantine.
    rules = [KeywordRule("PatientID", copy_from="EthnicGroup"),
             KeywordRule("InstitutionName", value="Relay test")]
    toolkit, embedded = Editor(rules, engine), Editor(rules)
    compared, refused, as_un = 0, {}, set()
    for i, src in enumerate(readable_bundled_files()):
        outs = tmp_path / f"{i}-toolkit.dcm", tmp_path / f"{i}-embedded.dcm"
        try:
            embedded.edit(src, outs[1])
        except BadInput:
            continue  # not an object the relay forwards (the embedded converter says why)
        try:
            toolkit.edit(src, outs[0])
        except BadInput as exc:
            refused[src.name] = str(exc)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a, b = dcmread(outs[0]), dcmread(outs[1])
        assert a.get("PatientID") == b.get("PatientID"), src.name
        assert a.InstitutionName == "Relay test", src.name
        differ = set(_elements(a)) ^ set(_elements(b))
        stored_as_un = _stored_as_un(src)
        assert {tag for tag, _, _ in differ} <= stored_as_un, src.name
        as_un |= {f"{src.name} {tag}" for tag, _, _ in differ}
        compared += 1
    print(f"\n{compared} files through both converters; differing only where stored as UN: "
          f"{sorted(as_un)}; refused by dcm4che: {refused}")
    assert compared >= 150
    assert set(refused) <= {"SC_rgb_jpeg.dcm", "DICOMDIR-nooffset"}
    assert all("dcm2xml failed" in why for why in refused.values())


def _stored_as_un(path: Path) -> set[str]:
    """Tags (as _elements names them) whose VR in the file itself is UN."""
    from pydicom import config

    keep = config.replace_un_with_known_vr
    config.replace_un_with_known_vr = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, stop_before_pixels=True)
        return {tag for tag, vr, _ in _elements(ds) if vr == "UN"}
    finally:
        config.replace_un_with_known_vr = keep


def _elements(ds: Dataset) -> list[tuple[str, str, bytes]]:
    """The data set's elements as (tag, VR, value bytes), recursively: what both converters
    must agree on."""
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for j, item in enumerate(elem.value):
                out += [(f"{elem.tag}[{j}]{t}", vr, v) for t, vr, v in _elements(item)]
            continue
        raw = elem.value
        value = raw if isinstance(raw, bytes) else str(raw).encode()
        out.append((str(elem.tag), elem.VR, value))
    return out


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

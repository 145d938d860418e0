"""Query/retrieve through the relay ([query], relay.services), against real peers only:
Orthanc as the central PACS (filled by C-STORE), DCMTK's findscu/movescu/getscu and dcm4che's
as the workstation, a DCMTK storescp as the C-MOVE destination.

Each engine runs the relay as `dicom-relay run` would: the SCP on [query].port everywhere,
and the embedded engine also on [receiver].port.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicomdata import ct_series
from peers import (
    DCM4CHE_HOME,
    DCMTK_BIN,
    ORTHANC,
    DcmtkStoreSCP,
    Orthanc,
    RelayProcess,
    dcm4che_env,
    dcmsend,
    dcmtk_env,
    free_port,
    proc_stats,
    relay_config,
    scripted_find_pacs,
    scripted_get_pacs,
    wait_for_port,
    wait_until,
    with_dcm4che,
)

STUDY_SIZE = 50
BIG_SIZE = 300
QR = {"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True}


@dataclass
class World:
    pacs: Orthanc
    viewer: DcmtkStoreSCP
    study: str  # the 50-instance study
    instances: set[str]
    other_study: str
    workdir: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not Path(ORTHANC).exists() or not (DCMTK_BIN / "findscu").exists():
        pytest.fail("Orthanc and DCMTK are installed by tests/run: run the suite with it")
    workdir = tmp_path_factory.mktemp("qr")
    pacs = Orthanc(workdir / "orthanc", extra=QR).start()
    viewer = DcmtkStoreSCP(workdir / "viewer")
    a = ct_series(workdir / "a", STUDY_SIZE, PatientID="QR-A", PatientName="Prior^Ana",
                  AccessionNumber="ACC-A")
    ct_series(workdir / "b", 3, PatientID="QR-B", PatientName="Other^Beto",
              AccessionNumber="ACC-B")
    for folder in ("a", "b"):
        dcmsend(sorted((workdir / folder).iterdir()), pacs.dicom_port, pacs.aet)
    assert pacs.count() == STUDY_SIZE + 3
    study = str(dcmread(workdir / "a" / "ct00000.dcm").StudyInstanceUID)
    other = str(dcmread(workdir / "b" / "ct00000.dcm").StudyInstanceUID)
    # The C-MOVE destination, as Orthanc knows it (for the direct comparisons).
    pacs.add_modality("viewer", viewer.aet, viewer.port)
    yield World(pacs, viewer, study, set(a), other, workdir)
    viewer.close()
    pacs.close()


@dataclass
class Relay:
    process: RelayProcess
    port: int  # [receiver].port
    query_port: int  # [query].port
    spool: Path

    def audit(self, step: str) -> list[dict[str, Any]]:
        path = self.spool / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if e["step"] == step]


def start_relay(world: World, name: str, engine: str = "embedded", *,
                retrieve: str = "get", query_destination_port: int | None = None,
                extra: str = "", receiver: str = "") -> Relay:
    workdir = world.workdir / name
    workdir.mkdir()
    port, query_port = free_port(), free_port()
    spool = workdir / "spool"
    config = relay_config(
        workdir / "relay.toml", port=port, spool=spool, engine=engine, receiver=receiver,
        destinations=[("central", world.pacs.aet, world.pacs.dicom_port)],
        extra=f"""
[query]
destination = "central"
port = {query_port}
retrieve = "{retrieve}"
move_ae_title = "RELAYQR"
{extra}

[[modalities]]
ae_title = "{world.viewer.aet}"
host = "127.0.0.1"
port = {world.viewer.port}
""")
    if query_destination_port is not None:  # a PACS that is down
        text = config.read_text().replace(f"port = {world.pacs.dicom_port}",
                                          f"port = {query_destination_port}")
        config.write_text(text)
    process = RelayProcess(config, workdir).start(port)
    wait_for_port(query_port, 60, process.proc)
    return Relay(process, port, query_port, spool)


@pytest.fixture(scope="module")
def relay(world: World) -> Iterator[Relay]:
    running = start_relay(world, "embedded")
    yield running
    running.process.stop()


# --- the workstations -------------------------------------------------------------------------


def findscu(port: int, level: str, keys: list[str], out: Path, model: str = "-S",
            extra: tuple[str, ...] = (), aec: str = "DICOMRELAY"
            ) -> tuple[list[Any], subprocess.CompletedProcess[str]]:
    """DCMTK findscu: the matches (data sets) and the run."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    argv = [str(DCMTK_BIN / "findscu"), "-aet", "WORKSTATION", "-aec", aec, model, "-X",
            "-od", str(out), *extra, "-k", f"QueryRetrieveLevel={level}"]
    for key in keys:
        argv += ["-k", key]
    run = subprocess.run([*argv, "127.0.0.1", str(port)], capture_output=True, text=True,
                         env=dcmtk_env(), timeout=120, check=False)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], run


def movescu(port: int, destination: str, study: str, aec: str = "DICOMRELAY"
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DCMTK_BIN / "movescu"), "-d", "-aet", "WORKSTATION", "-aec", aec, "-S",
         "-aem", destination, "-k", "QueryRetrieveLevel=STUDY",
         "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=300, check=False)


def getscu(port: int, study: str, out: Path, aec: str = "DICOMRELAY"
           ) -> subprocess.CompletedProcess[str]:
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [str(DCMTK_BIN / "getscu"), "-d", "-aet", "WORKSTATION", "-aec", aec, "-S",
         "-od", str(out), "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}",
         "127.0.0.1", str(port)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=300, check=False)


def final_counts(output: str) -> dict[str, int]:
    """The last C-MOVE/C-GET response's sub-operation counts, from DCMTK's -d output."""
    counts = {}
    for what in ("Completed", "Failed", "Warning"):
        found = re.findall(rf"{what} Suboperations\s*:\s*(\d+)", output)
        counts[what.lower()] = int(found[-1]) if found else -1
    return counts


def final_status(output: str) -> str:
    """The last DIMSE status DCMTK printed (e.g. 0xa801), lower case."""
    found = re.findall(r"DIMSE Status\s*:\s*(0x[0-9a-fA-F]{4})", output)
    return found[-1].lower() if found else ""


def uids_of(matches: list[Any], keyword: str) -> set[str]:
    return {str(m.get(keyword, "")) for m in matches}


def instance_uids(folder: Path) -> set[str]:
    return {str(dcmread(p, stop_before_pixels=True, force=True).SOPInstanceUID)
            for p in folder.iterdir() if p.is_file()}


# --- C-FIND ----------------------------------------------------------------------------------

LEVELS = {
    "PATIENT": ("-P", ["PatientID", "PatientName"], "PatientID"),
    "STUDY": ("-S", ["StudyInstanceUID", "PatientID", "AccessionNumber", "StudyDate"],
              "StudyInstanceUID"),
    "SERIES": ("-S", ["SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances"],
               "SeriesInstanceUID"),
    "IMAGE": ("-S", ["SOPInstanceUID", "InstanceNumber"], "SOPInstanceUID"),
}


@pytest.mark.parametrize("level", list(LEVELS))
def test_find_at_each_level_returns_what_orthanc_returns(world: World, relay: Relay,
                                                         level: str) -> None:
    model, keys, unique = LEVELS[level]
    if level in ("SERIES", "IMAGE"):
        keys = [f"StudyInstanceUID={world.study}", *keys]
    if level == "PATIENT":
        keys = ["PatientID=QR-*", "PatientName"]
    through, run = findscu(relay.port, level, keys, world.workdir / f"find-{level}", model)
    direct, _ = findscu(world.pacs.dicom_port, level, keys, world.workdir / f"direct-{level}",
                        model, aec=world.pacs.aet)
    assert through, run.stdout + run.stderr
    assert uids_of(through, unique) == uids_of(direct, unique)
    # Every returned key, value for value (compared as sets of the whole answers).
    def answers(ms: list[Any]) -> set[str]:
        return {repr(sorted((e.keyword, str(e.value)) for e in m if e.keyword)) for m in ms}
    assert answers(through) == answers(direct)
    expected = {"PATIENT": {"QR-A", "QR-B"}, "STUDY": None, "SERIES": None,
                "IMAGE": world.instances}[level]
    if expected is not None:
        assert uids_of(through, unique) == expected


def test_find_is_audited_and_on_the_query_port_too(world: World, relay: Relay) -> None:
    matches, _ = findscu(relay.query_port, "STUDY",
                         ["PatientID=QR-A", "StudyInstanceUID"], world.workdir / "find-q")
    assert uids_of(matches, "StudyInstanceUID") == {world.study}
    lines = wait_until(lambda: [e for e in relay.audit("query")
                                if "PatientID=QR-A" in e.get("keys", "")], 10,
                       what="the query's audit line")
    assert lines[-1]["object"] == "WORKSTATION" and lines[-1]["matches"] == 1
    assert lines[-1]["status"] == "0x0000" and lines[-1]["level"] == "STUDY"


@dataclass
class BigStudy:
    uid: str
    megabytes: float


@pytest.fixture(scope="module")
def big_study(world: World) -> BigStudy:
    """300 objects of ~0.5 MB (150 MB) at the PACS."""
    folder = world.workdir / "big"
    ct_series(folder, BIG_SIZE, PatientID="QR-BIG")
    _grow(folder)
    dcmsend(sorted(folder.iterdir()), world.pacs.dicom_port, world.pacs.aet)
    return BigStudy(str(dcmread(folder / "ct00000.dcm").StudyInstanceUID),
                    sum(p.stat().st_size for p in folder.iterdir()) / 1e6)


def test_cancelled_find_stops(world: World) -> None:
    """findscu cancels after 5 of 300 matches: the relay passes the C-CANCEL on to the PACS
    and ends with Cancel, not with all 300. The PACS is a scripted one that answers at 50
    matches a second: Orthanc sends 300 before a C-CANCEL can come back through the relay."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    study = generate_uid()
    matches = []
    for _ in range(BIG_SIZE):
        match = Dataset()
        match.QueryRetrieveLevel = "IMAGE"
        match.StudyInstanceUID = study
        match.SOPInstanceUID = generate_uid()
        matches.append(match)
    server, port, pacs_saw_cancel = scripted_find_pacs(matches, pace=0.02)
    relay = start_relay(world, "find-cancel", query_destination_port=port)
    try:
        found, run = findscu(relay.query_port, "IMAGE",
                             [f"StudyInstanceUID={study}", "SOPInstanceUID"],
                             world.workdir / "find-cancel-out", extra=("--cancel", "5", "-v"))
        assert 5 <= len(found) < BIG_SIZE, run.stdout + run.stderr
        assert "Cancel" in run.stdout + run.stderr
        assert pacs_saw_cancel.wait(10), "the C-CANCEL was passed on to the PACS"
        line = wait_until(lambda: [e for e in relay.audit("query") if e["status"] == "0xFE00"],
                          10, what="the cancelled query's audit line")
        assert 5 <= line[-1]["matches"] < BIG_SIZE
    finally:
        relay.process.stop()
        server.shutdown()


# --- C-MOVE and C-GET --------------------------------------------------------------------------


def test_move_of_a_50_instance_study_arrives_complete(world: World, relay: Relay) -> None:
    world.viewer.clear()
    at_pacs = world.pacs.count()
    run = movescu(relay.port, world.viewer.aet, world.study)
    out = run.stdout + run.stderr
    assert final_counts(out) == {"completed": STUDY_SIZE, "failed": 0, "warning": 0}, out
    assert final_status(out) == "0x0000"
    # Counts changed as the objects went (pending responses), not only at the end.
    remaining = [int(n) for n in re.findall(r"Remaining Suboperations\s*:\s*(\d+)",
                                            out)]
    assert len(set(remaining)) > 10, out
    wait_until(lambda: len(world.viewer.stored()) == STUDY_SIZE, 30, what="all at the viewer")
    assert instance_uids(world.viewer.folder) == world.instances
    # Retrieved objects never enter the routing spool, nor reach a destination.
    assert not list((relay.spool / "incoming").iterdir())
    assert world.pacs.count() == at_pacs
    line = wait_until(lambda: [e for e in relay.audit("retrieve")
                               if e.get("move_destination") == "VIEWER"], 10)[-1]
    assert (line["completed"], line["failed"], line["operation"]) == (STUDY_SIZE, 0, "C-MOVE")
    assert not list((relay.spool / "retrieving").iterdir())


def test_get_of_a_50_instance_study_arrives_complete(world: World, relay: Relay) -> None:
    out_dir = world.workdir / "get-out"
    run = getscu(relay.port, world.study, out_dir)
    out = run.stdout + run.stderr
    assert final_counts(out) == {"completed": STUDY_SIZE, "failed": 0, "warning": 0}, out
    assert instance_uids(out_dir) == world.instances
    line = wait_until(lambda: [e for e in relay.audit("retrieve")
                               if e.get("operation") == "C-GET"], 10)[-1]
    assert (line["completed"], line["status"]) == (STUDY_SIZE, "0x0000")


def test_unknown_move_destination_gets_a801(world: World, relay: Relay) -> None:
    run = movescu(relay.port, "NOBODY", world.study)
    assert final_status(run.stdout + run.stderr) == "0xa801", run.stdout + run.stderr
    line = wait_until(lambda: [e for e in relay.audit("retrieve")
                               if e.get("move_destination") == "NOBODY"], 10)[-1]
    assert line["status"] == "0xA801" and "[[modalities]]" in line["detail"]


def test_calling_aet_outside_the_query_list_cannot_query_but_can_store(world: World) -> None:
    relay = start_relay(world, "narrowed", extra='allowed_calling_aets = ["RADIOLOGY"]')
    try:
        matches, run = findscu(relay.port, "STUDY", ["StudyInstanceUID"],
                               world.workdir / "find-narrowed")
        assert not matches
        assert "No Acceptable Presentation Contexts" in run.stdout + run.stderr or \
            "rejected" in (run.stdout + run.stderr).lower(), run.stdout + run.stderr
        # On [query].port the AE title is refused outright.
        matches, run = findscu(relay.query_port, "STUDY", ["StudyInstanceUID"],
                               world.workdir / "find-narrowed-q")
        assert not matches and "Association Rejected" in run.stdout + run.stderr
        # Storing is the receiver's list, not the query one: still taken.
        one = world.workdir / "a" / "ct00000.dcm"
        dcmsend([one], relay.port, "DICOMRELAY", calling_aet="WORKSTATION")
        wait_until(lambda: relay.audit("received"), 20, what="the stored object's audit line")
    finally:
        relay.process.stop()


def test_the_receivers_tls_applies_to_the_query_port(world: World, tmp_path: Path) -> None:
    """[receiver.tls]: query/retrieve on [query].port takes TLS only, with a certificate of
    our CA (the PACS behind stays plain). A peer that connected and never started its TLS
    handshake keeps no one else waiting (pynetdicom made every handshake in the thread that
    accepts every connection)."""
    import socket

    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind
    from security.pki import make_pki

    from relay.config.model import TLSConfig
    from relay.toolkits.tls import client_context

    pki = make_pki(tmp_path / "pki")
    relay = start_relay(world, "tls", receiver=(
        f'[receiver.tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
        f'ca = "{pki.ca}"\n'))

    def studies(tls: bool) -> set[str] | None:
        ae = AE("WORKSTATION")
        ae.connection_timeout = 20  # its TLS handshake included: kept waiting, it fails
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        context = client_context(TLSConfig(ca=pki.ca, certificate=pki.client_cert,
                                           private_key=pki.client_key))
        assoc = ae.associate("127.0.0.1", relay.query_port, ae_title="DICOMRELAY",
                             tls_args=(context, "127.0.0.1") if tls else None)
        if not assoc.is_established:
            return None
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.PatientID = "QR-A"
        query.StudyInstanceUID = ""
        found = {str(match.StudyInstanceUID) for status, match in
                 assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                 if match is not None and int(status.Status) in (0xFF00, 0xFF01)}
        assoc.release()
        return found

    silent = socket.create_connection(("127.0.0.1", relay.query_port))
    try:
        assert studies(tls=True) == {world.study}
        assert studies(tls=False) is None
    finally:
        silent.close()
        relay.process.stop()


def test_pacs_down_gives_a_failure_status_not_a_hang(world: World) -> None:
    relay = start_relay(world, "pacs-down", query_destination_port=free_port())
    try:
        started = time.monotonic()
        matches, run = findscu(relay.port, "STUDY", ["StudyInstanceUID"],
                               world.workdir / "find-down", extra=("-v",))
        out = run.stdout + run.stderr
        assert not matches
        assert re.search(r"Status.*0xc001|Unable to process|Failed: Unable", out, re.I), out
        move = movescu(relay.port, world.viewer.aet, world.study)
        assert final_status(move.stdout + move.stderr).startswith("0xc"), move.stdout
        get = getscu(relay.query_port, world.study, world.workdir / "get-down")
        assert final_status(get.stdout + get.stderr).startswith("0xc"), get.stdout
        assert time.monotonic() - started < 90  # each gave up within the timeouts
        lines = relay.audit("query") + relay.audit("retrieve")
        assert len(lines) == 3 and all("PACS" in e.get("detail", "") or "central" in
                                       e.get("detail", "") for e in lines), lines
    finally:
        relay.process.stop()


def test_cancelled_get_stops_and_is_cancelled_at_the_pacs(world: World, relay: Relay,
                                                         big_study: BigStudy) -> None:
    """A workstation (pynetdicom, scriptable) cancels its C-GET after 20 of 300 objects."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

    ae = AE("WORKSTATION")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(CTImageStorage)
    stored: list[int] = []

    def on_store(event: Any) -> int:
        stored.append(1)
        if len(stored) == 20:
            get_context = next(cx for cx in event.assoc.accepted_contexts
                               if cx.abstract_syntax == StudyRootQueryRetrieveInformationModelGet)
            event.assoc.send_c_cancel(1, get_context.context_id)
        return 0x0000

    assoc = ae.associate("127.0.0.1", relay.port, ae_title="DICOMRELAY",
                         ext_neg=[build_role(CTImageStorage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    request = Dataset()
    request.QueryRetrieveLevel = "STUDY"
    request.StudyInstanceUID = big_study.uid
    statuses = [int(status.Status) for status, _ in
                assoc.send_c_get(request, StudyRootQueryRetrieveInformationModelGet, msg_id=1)
                if "Status" in status]
    assoc.release()
    assert statuses[-1] == 0xFE00 and 20 <= len(stored) < BIG_SIZE, (statuses[-3:], len(stored))
    wait_until(lambda: "C-CANCEL passed on to central" in relay.process.output(), 10,
               what="the C-CANCEL passed on to the PACS")
    wait_until(lambda: not list((relay.spool / "retrieving").iterdir()), 30,
               what="the retrieve's folder removed")
    line = wait_until(lambda: [e for e in relay.audit("retrieve") if e["status"] == "0xFE00"],
                      10)[-1]
    assert line["completed"] < BIG_SIZE


def test_a_300_instance_retrieve_stays_in_bounded_memory(world: World, relay: Relay,
                                                        big_study: BigStudy) -> None:
    """300 objects of ~0.5 MB (150 MB) through C-GET: the relay's peak memory grows by far
    less than the study (one object is in memory at a time)."""
    study, size_mb = big_study.uid, big_study.megabytes
    assert relay.process.proc is not None
    before, _ = proc_stats(relay.process.proc.pid)
    out_dir = world.workdir / "big-out"
    run = getscu(relay.port, study, out_dir)
    after, _ = proc_stats(relay.process.proc.pid)
    assert final_counts(run.stdout + run.stderr)["completed"] == BIG_SIZE, run.stdout
    assert len(list(out_dir.iterdir())) == BIG_SIZE
    assert after - before < size_mb / 3, (before, after, size_mb)


def _grow(folder: Path) -> None:
    """Make each CT 512 x 512 (0.5 MB of pixels), keeping its UIDs."""
    for path in folder.iterdir():
        ds = dcmread(path)
        ds.Rows = ds.Columns = 512
        ds.PixelData = bytes(512 * 512 * 2)
        ds.save_as(path)


# --- the other engines, and dcm4che's tools as the workstation ----------------------------------


def dcm4che(tool: str, *args: str) -> subprocess.CompletedProcess[str]:
    assert DCM4CHE_HOME is not None
    return subprocess.run([str(DCM4CHE_HOME / "bin" / tool), "-b", "WORKSTATION", *args],
                          capture_output=True, text=True, env=dcm4che_env(), timeout=300,
                          check=False)


def dcm4che_counts(output: str) -> tuple[int, int]:
    """(completed, failed) of dcm4che's last C-MOVE/C-GET response."""
    found = re.findall(r"completed=(\d+), failed=(\d+)", output)
    return (int(found[-1][0]), int(found[-1][1])) if found else (-1, -1)


@pytest.mark.parametrize("engine", ["dcmtk", *with_dcm4che("dcm4che")])
def test_toolkit_engines_serve_query_retrieve_on_the_query_port(world: World, engine: str,
                                                                 ) -> None:
    relay = start_relay(world, f"engine-{engine}", engine)
    try:
        matches, run = findscu(relay.query_port, "SERIES",
                               [f"StudyInstanceUID={world.study}", "SeriesInstanceUID"],
                               world.workdir / f"find-{engine}")
        assert len(matches) == 1, run.stdout + run.stderr
        world.viewer.clear()
        move = movescu(relay.query_port, world.viewer.aet, world.study)
        assert final_counts(move.stdout + move.stderr)["completed"] == STUDY_SIZE
        wait_until(lambda: len(world.viewer.stored()) == STUDY_SIZE, 30)
        out_dir = world.workdir / f"get-{engine}"
        get = getscu(relay.query_port, world.study, out_dir)
        assert final_counts(get.stdout + get.stderr)["completed"] == STUDY_SIZE
        assert instance_uids(out_dir) == world.instances
    finally:
        relay.process.stop()


@pytest.mark.parametrize("dummy", with_dcm4che("dcm4che-tools"))
def test_dcm4che_workstation_finds_moves_and_gets(world: World, relay: Relay,
                                                  dummy: str) -> None:
    connect = ["-c", f"DICOMRELAY@127.0.0.1:{relay.port}"]
    out_dir = world.workdir / "dcm4che-find"
    out_dir.mkdir()
    find = dcm4che("findscu", *connect, "-M", "StudyRoot", "-L", "IMAGE",
                   "-m", f"StudyInstanceUID={world.study}", "-r", "SOPInstanceUID",
                   "--out-dir", str(out_dir), "--out-file", "match.dcm")
    assert instance_uids(out_dir) == world.instances, find.stdout + find.stderr
    world.viewer.clear()
    move = dcm4che("movescu", *connect, "-M", "StudyRoot", "-L", "STUDY", "--dest",
                   world.viewer.aet, "-m", f"StudyInstanceUID={world.study}")
    assert dcm4che_counts(move.stdout + move.stderr) == (STUDY_SIZE, 0), move.stdout
    wait_until(lambda: len(world.viewer.stored()) == STUDY_SIZE, 30)
    get_dir = world.workdir / "dcm4che-get"
    get = dcm4che("getscu", *connect, "-M", "StudyRoot", "-L", "STUDY",
                  "-m", f"StudyInstanceUID={world.study}", "--directory", str(get_dir))
    assert dcm4che_counts(get.stdout + get.stderr) == (STUDY_SIZE, 0), get.stdout
    assert instance_uids(get_dir) == world.instances


@pytest.mark.parametrize("engine", ["embedded", "dcmtk"])
def test_retrieve_by_move_to_the_relay_itself(world: World, engine: str) -> None:
    """retrieve = "move": the PACS stores to the relay's own AE, on [receiver].port
    (embedded: another process than the one serving [query].port) or [query].port."""
    relay = start_relay(world, f"by-move-{engine}", engine, retrieve="move")
    try:
        port = relay.port if engine == "embedded" else relay.query_port
        world.pacs.add_modality("relayqr", "RELAYQR", port)
        out_dir = world.workdir / f"by-move-get-{engine}"
        get = getscu(relay.query_port, world.study, out_dir)
        assert final_counts(get.stdout + get.stderr)["completed"] == STUDY_SIZE, get.stdout
        assert instance_uids(out_dir) == world.instances
        assert not list((relay.spool / "incoming").iterdir())
        assert world.pacs.count() >= STUDY_SIZE  # nothing new was routed to it
    finally:
        relay.process.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_query_scp_is_started_again_when_it_dies(tmp_path: Path) -> None:
    """ServicesServer.check() (the relay's main loop calls it): a server whose loop died is
    started again on the same port, and answers."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from relay.config.load import load_config
    from relay.events import EventBus
    from relay.services.scp import QueryRetrieve, ServicesServer

    query_port = free_port()
    config = load_config(relay_config(
        tmp_path / "relay.toml", port=free_port(), spool=tmp_path / "spool",
        destinations=[("central", "PACS", free_port())],
        extra=f'[query]\ndestination = "central"\nport = {query_port}\n'))

    def echo() -> bool:
        ae = AE("WORKSTATION")
        ae.acse_timeout = 2  # a dead loop accepts no association: do not wait 30 s for it
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", query_port, ae_title="DICOMRELAY")
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return int(status.get("Status", -1)) == 0

    server = ServicesServer(config, config.query.port,
                            query=QueryRetrieve(config, tmp_path / "spool", EventBus()))
    server.start()
    try:
        assert echo()
        def fail() -> None:  # a fault in its accept loop (faked: none is known to happen)
            raise RuntimeError("the loop broke")

        server.server.service_actions = fail
        wait_until(lambda: not server._thread.is_alive(), 10, what="the loop to die")
        assert not echo()
        server.check()
        assert server.restarts == 1 and echo()
    finally:
        server.stop()


def test_only_the_pacs_sub_operations_of_our_move_are_taken_from_the_routing_path(
        tmp_path: Path) -> None:
    """Inboxes.accept, the check the embedded receiver makes on every C-STORE: while a
    move inbox is open, a modality's new study (no move originator), another archive's
    C-MOVE to the relay (another originator, or another calling AE) and a sub-operation of a
    move no inbox waits for all go to the routing spool (None); the PACS's sub-operation of
    our move lands in the inbox."""
    from io import BytesIO
    from types import SimpleNamespace

    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.events import Event

    from relay.services.retrieve import Inboxes

    inboxes = Inboxes(tmp_path / "retrieving", pacs_ae="ORTHANC", originator_ae="DICOMRELAY")
    msg_id, folder = inboxes.open()

    def store(calling: str, originator_id: int | None, originator_ae: str | None = None,
              **kwargs: bool) -> int | None:
        request = C_STORE()
        request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        request.AffectedSOPInstanceUID = "1.2.3.4"
        request.MoveOriginatorMessageID = originator_id
        request.MoveOriginatorApplicationEntityTitle = originator_ae
        request.DataSet = BytesIO(b"\x08\x00\x18\x00\x08\x00\x00\x001.2.3.4\x00")
        assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=calling))
        event = Event(assoc, SimpleNamespace(description="C-STORE", is_intervention=True),
                      {"request": request,
                       "context": SimpleNamespace(transfer_syntax="1.2.840.10008.1.2")})
        return inboxes.accept(event, **kwargs)

    assert store("CT01", None) is None  # a modality's new study
    assert store("OTHERPACS", msg_id, "WORKSTATION") is None  # another archive's move
    assert store("ORTHANC", msg_id, "WORKSTATION") is None  # someone else's move at the PACS
    assert store("ORTHANC", (msg_id % 65535) + 1, "DICOMRELAY") is None  # no such inbox
    assert store("ORTHANC", None) is None  # names no move: routed (on [receiver].port)
    assert not list(folder.iterdir())
    assert store("ORTHANC", msg_id, "DICOMRELAY") == 0x0000
    assert store("ORTHANC", None, only_inbox=True) == 0x0000  # [query].port: the one inbox
    assert len(list(folder.iterdir())) == 2


# --- a C-MOVE served by the relay: the engine's sender stores, DCMTK's getscu fetches ----------


@pytest.mark.parametrize("engine", ["embedded", "dcmtk", *with_dcm4che("dcm4che")])
def test_a_move_on_the_query_port_goes_through_the_engines_own_tools(world: World,
                                                                     engine: str) -> None:
    """On [query].port the relay serves C-MOVE itself (relay.services.move): the engine's
    sender stores to the move destination; on DCMTK, getscu fetches from the PACS. Complete
    with the right counts; an unknown destination and one that is down get A801."""
    down = free_port()
    relay = start_relay(world, f"served-{engine}", engine, extra=f"""
[[modalities]]
ae_title = "DOWN"
host = "127.0.0.1"
port = {down}
""")
    try:
        world.viewer.clear()
        move = movescu(relay.query_port, world.viewer.aet, world.study)
        out = move.stdout + move.stderr
        assert final_counts(out) == {"completed": STUDY_SIZE, "failed": 0, "warning": 0}, out
        assert final_status(out) == "0x0000", out
        wait_until(lambda: len(world.viewer.stored()) == STUDY_SIZE, 30, what="all at the viewer")
        assert instance_uids(world.viewer.folder) == world.instances
        # The toolkits' own C-GET SCU fetched (DCMTK's getscu, dcm4che's in its JVM).
        assert ("own C-GET SCU" in relay.process.output()) == (engine != "embedded")
        unknown = movescu(relay.query_port, "NOBODY", world.study)
        assert final_status(unknown.stdout + unknown.stderr) == "0xa801"
        gone = movescu(relay.query_port, "DOWN", world.study)
        assert final_status(gone.stdout + gone.stderr) == "0xa801", gone.stdout + gone.stderr
        lines = wait_until(lambda: (lambda found: found if len(found) == 3 else None)(
            relay.audit("retrieve")), 10, what="three retrieves audited")
        assert [(e["move_destination"], e["status"]) for e in lines] == [
            ("VIEWER", "0x0000"), ("NOBODY", "0xA801"), ("DOWN", "0xA801")], lines
        assert lines[0]["completed"] == STUDY_SIZE
        assert "cannot store to the move destination DOWN" in lines[2]["detail"]
        wait_until(lambda: not list((relay.spool / "retrieving").iterdir()), 30,
                   what="the retrieves' folders removed")
        assert not list((relay.spool / "incoming").iterdir())
    finally:
        relay.process.stop()


@pytest.mark.parametrize("engine", ["dcmtk", *with_dcm4che("dcm4che")])
def test_a_cancelled_move_stops_the_toolkits_get(world: World, big_study: BigStudy,
                                                 engine: str) -> None:
    """A workstation (pynetdicom) cancels its C-MOVE at the first pending response: the relay
    stops the toolkit's C-GET (getscu's association aborted; dcm4che's JVM sends a C-CANCEL)
    and its sender, answers Cancel with what was done, and cleans up."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as Move

    relay = start_relay(world, f"cancel-{engine}", engine)
    try:
        ae = AE("WORKSTATION")
        ae.add_requested_context(Move)
        assoc = ae.associate("127.0.0.1", relay.query_port, ae_title="DICOMRELAY")
        assert assoc.is_established
        request = Dataset()
        request.QueryRetrieveLevel = "STUDY"
        request.StudyInstanceUID = big_study.uid
        final = None
        for rsp, _ in assoc.send_c_move(request, world.viewer.aet, Move, msg_id=1):
            if "Status" not in rsp:
                break
            if int(rsp.Status) in (0xFF00, 0xFF01):
                assoc.send_c_cancel(1, assoc.accepted_contexts[0].context_id)
            else:
                final = rsp
        assoc.release()
        assert final is not None and int(final.Status) == 0xFE00, final
        assert int(final.NumberOfCompletedSuboperations) < BIG_SIZE
        assert int(final.NumberOfRemainingSuboperations) > 0
        wait_until(lambda: not list((relay.spool / "retrieving").iterdir()), 30,
                   what="the retrieve's folder removed")
        line = wait_until(lambda: relay.audit("retrieve"), 10)[-1]
        assert line["status"] == "0xFE00"
        wait_until(lambda: "retrieve cancelled" in relay.process.output(), 10,
                   what="the cancel in the log")
    finally:
        relay.process.stop()


def test_getscus_debug_output_names_each_stored_object_and_the_counts(tmp_path: Path) -> None:
    """getscu --debug as it prints (lines of a real run): a success names a file of the
    folder; a failed C-STORE response names none; each C-GET response gives its counts."""
    from relay.toolkits.dcmtk import getscu_updates

    uid_a, uid_b = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    (tmp_path / f"MR.{uid_a}").write_bytes(b"x")  # <modality>.<UID>
    (tmp_path / uid_b).write_bytes(b"x")  # --bit-preserving: the UID alone
    (tmp_path / "CT..._x").write_bytes(b"x")  # getscu's name for a UID "../x"
    (tmp_path / ".query.dcm").write_bytes(b"x")  # the relay's identifier file

    def store_rsp(uid: str, status: str) -> list[str]:
        return ["I: Sending C-STORE Response",
                "D: Message Type                  : C-STORE RSP",
                f"D: Affected SOP Instance UID     : {uid}",
                f"D: DIMSE Status                  : {status}"]

    def get_rsp(remaining: str, completed: int, failed: int, status: str) -> list[str]:
        return ["D: Message Type                  : C-GET RSP",
                f"D: Remaining Suboperations       : {remaining}",
                f"D: Completed Suboperations       : {completed}",
                f"D: Failed Suboperations          : {failed}",
                "D: Warning Suboperations         : 0",
                f"D: DIMSE Status                  : {status}"]

    lines = [*store_rsp(uid_a, "0x0000: Success"),
             *get_rsp("2", 1, 0, "0xff00: Pending: Sub-operations are continuing"),
             *store_rsp("1.2.3.4", "0xa700: Failure: Out of resources"),
             *store_rsp(uid_b, "0x0000: Success"),
             *store_rsp("../x", "0x0000: Success"),
             *store_rsp(".query.dcm", "0x0000: Success"),
             *get_rsp("none", 2, 1, "0xb000: Warning: Sub-operations complete")]
    updates = list(getscu_updates(lines, tmp_path))
    assert [(u.path, u.uid) for u in updates if u.path] == [
        (tmp_path / f"MR.{uid_a}", uid_a), (tmp_path / uid_b, uid_b)]
    assert [(u.status, u.remaining, u.completed, u.failed) for u in updates if u.status] == [
        (0xFF00, 2, 1, 0), (0xB000, 0, 2, 1)]


@pytest.mark.parametrize("engine", ["dcmtk", *with_dcm4che("dcm4che")])
def test_a_pacs_uid_that_is_a_path_writes_nothing_outside_the_retrieve(world: World,
                                                                      engine: str) -> None:
    """A PACS (pynetdicom, scripted) answers the relay's C-GET with two objects, one whose
    SOP Instance UID is "../escaped": the toolkit's C-GET writes nothing outside the
    retrieve's folder (getscu's bit-preserving mode would have), and the move accounts for
    both objects."""
    good = dcmread(world.workdir / "a" / "ct00000.dcm")
    hostile = dcmread(world.workdir / "a" / "ct00001.dcm")
    hostile.SOPInstanceUID = "../escaped"
    server, port = scripted_get_pacs([good, hostile])
    relay = start_relay(world, f"hostile-{engine}", engine, query_destination_port=port)
    try:
        world.viewer.clear()
        move = movescu(relay.query_port, world.viewer.aet, world.study)
        counts = final_counts(move.stdout + move.stderr)
        assert counts["completed"] + counts["failed"] == 2, move.stdout + move.stderr
        assert counts["completed"] >= 1
        assert str(good.SOPInstanceUID) in instance_uids(world.viewer.folder)
        wait_until(lambda: not list((relay.spool / "retrieving").iterdir()), 30,
                   what="the retrieve's folder removed")
        assert not list(relay.spool.parent.rglob("*escaped*"))
    finally:
        relay.process.stop()
        server.shutdown()


class _FakeFetch:
    """What forward_objects reads of a Fetch: objects arriving in two batches."""

    def __init__(self, batches: list[list[Path]]) -> None:
        self.batches = batches
        self.uids = {p: f"uid-{p.name}" for batch in batches for p in batch}
        self.failed_uids: list[str] = []
        self.error = ""
        self.cancelled = False

    def arrived(self, timeout: float) -> list[Path]:
        return self.batches.pop(0) if self.batches else []

    @property
    def finished(self) -> bool:
        return not self.batches

    def cancel(self) -> None:
        self.cancelled = True


class _FakeEngine:
    """An engine whose sender answers each file as `answers` says (a unit test's fake)."""

    def __init__(self, answers: dict[str, tuple[Any, int | None]]) -> None:
        self.answers = answers
        self.batches: list[int] = []

    def send(self, files: list[Path], destination: Any, calling_ae: str, timeout: float,
             keep_open: bool = False, confirm_each: bool = True) -> Iterator[Any]:
        from relay.send.results import SendResult

        assert not confirm_each  # a move's objects are never sent again: no need
        self.batches.append(len(files))
        for path in files:
            outcome, status = self.answers[path.name]
            yield SendResult(path, outcome, status, "test")


def test_a_served_move_counts_each_result_and_ends_with_the_right_status(tmp_path: Path) -> None:
    from relay.config.model import Destination
    from relay.send.results import Outcome
    from relay.services.move import forward_objects

    files = [tmp_path / name for name in ("a", "b", "c", "d")]
    for path in files:
        path.write_bytes(b"x")
    target = Destination("VIEWER", "VIEWER", "127.0.0.1", 1)

    def run(answers: dict[str, tuple[Any, int | None]], total: int = 4,
            cancel_after: int | None = None) -> tuple[list[Any], _FakeFetch]:
        for path in files:
            path.write_bytes(b"x")
        fetch = _FakeFetch([files[:1], files[1:]])
        asked = [0]

        def cancelled() -> bool:
            asked[0] += 1
            return cancel_after is not None and asked[0] > cancel_after

        return list(forward_objects(fetch, total, _FakeEngine(answers), target,  # type: ignore[arg-type]
                                    "RELAY", 5, cancelled)), fetch

    ok = (Outcome.DELIVERED, 0)
    progress, _ = run({"a": ok, "b": (Outcome.DELIVERED, 0xB007), "c": ok,
                       "d": (Outcome.FAILED, 0xA900)})
    final = progress[-1]
    assert (final.status, final.completed, final.warning, final.failed) == (0xB000, 2, 1, 1)
    assert final.failed_uids == ("uid-d",)
    assert all(p.pending for p in progress[:-1]) and progress[0].remaining == 3
    assert not any(path.exists() for path in files)  # each left once answered

    progress, _ = run({name: ok for name in "abcd"}, total=5)  # the PACS brought one less
    assert (progress[-1].status, progress[-1].completed, progress[-1].failed) == (0xB000, 4, 1)

    progress, fetch = run({name: (Outcome.RETRY, None) for name in "abcd"})
    assert (progress[-1].status, fetch.cancelled) == (0xA801, True)  # nothing stored: stop

    progress, fetch = run({name: ok for name in "abcd"}, cancel_after=2)
    assert progress[-1].status == 0xFE00 and fetch.cancelled
    assert progress[-1].remaining > 0 and progress[-1].completed < 4

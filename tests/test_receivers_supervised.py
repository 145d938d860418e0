"""Receivers under their supervisor (DCMTK's storescp, and the embedded engine's own receiver
process under `run`), with real processes: kill -9, SIGTERM, and a storescp killed in the
middle of writing a large object."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_e2e import write_config

from dicomdata import ct_series, multiframe_ct
from peers import (
    Orthanc,
    RelayProcess,
    dcmread_bytes,
    dcmsend,
    dcmtk_env,
    free_port,
    spool_files,
    wait_until,
    with_dcm4che,
)
from relay.receive.supervisor import port_in_use

pytestmark = pytest.mark.e2e


def storescp_pids(relay: RelayProcess) -> list[int]:
    """The receiver processes the relay started: storescp, or the embedded engine's
    `dicom-relay receive` child."""
    return [int(p) for p in re.findall(
        r"(?:storescp|receiver) (?:started|restarted) \(pid (\d+)\)", relay.output())]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().split(")")[-1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def _start(tmp_path: Path, orthanc: Orthanc, engine: str) -> tuple[int, Path, RelayProcess]:
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "relay.toml", port=port, spool=spool,
                       destinations=[("central", orthanc)], engine=engine)
    relay = RelayProcess(cfg, tmp_path).start(port)
    # The port answers a moment before the relay logs the receiver's pid.
    wait_until(lambda: storescp_pids(relay), 10, what="the receiver's pid in the log")
    return port, spool, relay


@pytest.fixture(params=["dcmtk", "embedded", *with_dcm4che("dcm4che")])
def supervised_relay(request: pytest.FixtureRequest, tmp_path: Path, orthanc: Orthanc,
                     dcmtk: Path):  # noqa: ANN201
    """A relay whose receiver is a supervised process: storescp, or under `run` the
    embedded engine's `dicom-relay receive` child."""
    started = _start(tmp_path, orthanc, request.param)
    yield started
    started[2].stop()


def test_storescp_is_restarted_after_kill_9(
        tmp_path: Path, orthanc: Orthanc,
        supervised_relay: tuple[int, Path, RelayProcess]) -> None:
    port, _spool, relay = supervised_relay
    [first] = storescp_pids(relay)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: len(storescp_pids(relay)) == 2, 20, what="storescp restarted")
    assert "exited with -9; restarting" in relay.output()
    wait_until(lambda: port_in_use("0.0.0.0", port), 10, what="listening again")  # noqa: S104
    uids = ct_series(tmp_path / "ct", 3, ethnic_group="AFTERKILL")
    assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY").returncode == 0
    wait_until(lambda: orthanc.count() == 3, 30, what="relayed after the restart")
    assert set(orthanc.tags_by_sop_uid()) == set(uids)


def test_sigterm_stops_everything_and_leaves_no_orphan(
        supervised_relay: tuple[int, Path, RelayProcess]) -> None:
    port, _spool, relay = supervised_relay
    [pid] = storescp_pids(relay)
    assert relay.proc is not None
    # stop() sends SIGTERM and waits (bounded; it raises if the relay does not exit).
    code = relay.stop(timeout=10)
    assert code == 0
    assert not alive(pid)
    assert group_members(pid) == [], "a storescp child survived"
    assert not port_in_use("0.0.0.0", port)  # noqa: S104


def _being_written(spool: Path, engine: str) -> list[Path]:
    """Where each toolkit's storescp writes an object it is receiving: DCMTK in receiving/,
    dcm4che as `<uid>.part` in incoming/."""
    if engine == "dcmtk":
        return spool_files(spool, "receiving")
    return [p for p in spool_files(spool, "incoming") if p.suffix == ".part"]


@pytest.fixture(params=["dcmtk", *with_dcm4che("dcm4che")])
def toolkit_relay(request: pytest.FixtureRequest, tmp_path: Path, orthanc: Orthanc,
                  dcmtk: Path):  # noqa: ANN201
    started = _start(tmp_path, orthanc, request.param)
    yield (*started, request.param)
    started[2].stop()


def test_receiver_killed_mid_object_forwards_nothing_truncated(
        tmp_path: Path, orthanc: Orthanc,
        toolkit_relay: tuple[int, Path, RelayProcess, str]) -> None:
    port, spool, relay, engine = toolkit_relay
    big = tmp_path / "big.dcm"
    uid = multiframe_ct(big, 300)
    size = big.stat().st_size
    [pid] = storescp_pids(relay)
    modality = subprocess.Popen(
        ["/usr/bin/dcmsend", "-aec", "DICOMRELAY", "127.0.0.1", str(port), str(big)],
        env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # Wait for storescp to be writing the object, then kill the receiver (its whole group).
    deadline = time.monotonic() + 60
    written = 0
    while time.monotonic() < deadline and written == 0:
        for f in _being_written(spool, engine):
            written = f.stat().st_size
        time.sleep(0.001)
    os.killpg(pid, signal.SIGKILL)
    assert 0 < written < size, f"killed with {written} of {size} bytes written"
    assert modality.wait(timeout=60) != 0, "the modality got no success"

    # Restarted; what was half-written is quarantined, not forwarded.
    wait_until(lambda: len(storescp_pids(relay)) == 2, 30, what="storescp restarted")
    failed = [p for p in spool_files(spool, "failed/incomplete-receive")
              if p.suffix != ".json"]
    assert len(failed) == 1 and failed[0].stat().st_size < size
    assert orthanc.count() == 0 and spool_files(spool, "incoming") == []
    assert spool_files(spool, "out") == [] and spool_files(spool, "work") == []

    # The modality sends again: the complete object arrives, whole.
    wait_until(lambda: port_in_use("0.0.0.0", port), 10, what="listening again")  # noqa: S104
    assert dcmsend([big], port, "DICOMRELAY").returncode == 0
    wait_until(lambda: orthanc.count() == 1, 120, what="the resent object")
    [(stored_uid, stored)] = orthanc.stored().items()
    assert stored_uid == uid and stored.PatientID == "BIG"
    # Whole: every frame, every pixel byte as sent, and nothing else changed but the rule's.
    original = dcmread_bytes(big.read_bytes(), pixels=True)
    assert stored.NumberOfFrames == original.NumberOfFrames > 1000
    assert stored.PixelData == original.PixelData
    # PatientID is set from EthnicGroup; Data Set Trailing Padding carries nothing and may be
    # dropped on the way (PS3.10).
    rule = {0x00100020, 0xFFFCFFFC}
    assert set(stored.keys()) - rule == set(original.keys()) - rule  # noqa: SIM118 - tags
    assert [e.keyword for e in original if e.tag not in rule
            and stored[e.tag].value != e.value] == []


def test_only_marked_objects_are_handed_over(tmp_path: Path, dcmtk: Path) -> None:
    # storescp leaves `<name>.done` (with --exec-sync, before it answers success): an object
    # with its marker goes on to incoming/, one without was never acknowledged.
    from relay.config.load import load_config
    from relay.spool import Spool
    from relay.toolkits.dcmtk import DcmtkEngine

    cfg = load_config(write_config(tmp_path / "relay.toml", port=free_port(),
                                   spool=tmp_path / "spool", destinations=[], engine="dcmtk"))
    spool = Spool(tmp_path / "spool", []).create()
    receiver = DcmtkEngine(dcmtk).receiver(cfg, spool)
    (spool.receiving / "CT.1.2.3").write_bytes(b"complete")
    (spool.receiving / "CT.1.2.3.done").write_bytes(b"")
    (spool.receiving / "CT.1.2.4").write_bytes(b"cut sh")
    (spool.receiving / "CT.1.2.5.done").write_bytes(b"")  # orphan: its object moved already
    receiver.sweep()  # type: ignore[attr-defined]
    assert [p.name for p in spool.ready_incoming()] == ["CT.1.2.3"]
    assert [p.name for p in spool_files(tmp_path / "spool", "failed/incomplete-receive")
            if p.suffix != ".json"] == ["CT.1.2.4"]
    assert list(spool.receiving.iterdir()) == []

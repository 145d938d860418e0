"""End to end with real peers on 127.0.0.1: DCMTK dcmsend (modality) → `dicom-relay run`
(a subprocess, as systemd runs it) → Orthanc (destination PACS), checked through Orthanc's
REST API. Nothing here fakes the network peer."""

from __future__ import annotations

import json
import urllib.request
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from dicomdata import bundled, copy_with_new_uids, ct_series, mixed_study
from peers import (
    EG_RULE,
    ENGINES,
    Orthanc,
    RelayProcess,
    dcmsend,
    dcmsend_statuses,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)

pytestmark = pytest.mark.e2e


def write_config(path: Path, *, port: int, spool: Path, destinations: list[tuple[str, Orthanc]],
                 rules: str | None = None, extra: str = "", engine: str = "embedded",
                 converter: str = "embedded") -> Path:
    """A relay config forwarding to Orthancs, with the founding rule unless told otherwise."""
    return relay_config(path, port=port, spool=spool, engine=engine, converter=converter,
                        destinations=[(name, pacs.aet, pacs.dicom_port)
                                      for name, pacs in destinations],
                        rules=EG_RULE if rules is None else rules, extra=extra)


def _read_bytes(data: bytes):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(DicomBytesIO(data))


def _stored_file(pacs: Orthanc, sop_uid: str) -> bytes:
    [iid] = [i for i in pacs.instance_ids()
             if pacs.rest(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == sop_uid]
    url = f"http://127.0.0.1:{pacs.http_port}/instances/{iid}/file"
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _assert_spool_empty(spool: Path) -> None:
    for folder in ("incoming", "work", "out", "failed"):
        assert spool_files(spool, folder) == [], f"spool/{folder} is not empty"


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def relay_setup(tmp_path: Path, orthanc: Orthanc, dcmtk: Path, engine: str):  # noqa: ANN201
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "relay.toml", port=port, spool=spool,
                       destinations=[("central", orthanc)], engine=engine)
    relay = RelayProcess(cfg, tmp_path).start(port)
    yield port, spool, relay
    code = relay.stop()
    assert code == 0, relay.output()


EXPLICIT_LE = "1.2.840.10008.1.2.1"
BIG_ENDIAN = "1.2.840.10008.1.2.2"


def _swap16(data: bytes) -> bytes:
    swapped = bytearray(data)
    swapped[0::2], swapped[1::2] = data[1::2], data[0::2]
    return bytes(swapped)


def test_mixed_study_arrives_rewritten_and_unchanged_otherwise(
        tmp_path: Path, orthanc: Orthanc, relay_setup: tuple[int, Path, RelayProcess]) -> None:
    port, spool, relay = relay_setup
    sent = mixed_study(tmp_path / "study")
    files = {_read_bytes(f.read_bytes()).SOPInstanceUID: f
             for f in sorted((tmp_path / "study").iterdir())}
    result = dcmsend(sorted(files.values()), port, "DICOMRELAY")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: orthanc.count() >= len(sent), 60, what="every instance at Orthanc")
    tags = orthanc.tags_by_sop_uid()
    assert set(tags) == set(sent), "every instance arrived, nothing else"
    for uid, info in sent.items():
        assert tags[uid]["PatientID"] == info["ethnic_group"], info["source"]
        relayed = _read_bytes(_stored_file(orthanc, uid))
        original = _read_bytes(files[uid].read_bytes())
        syntax = original.file_meta.TransferSyntaxUID
        # dcmsend itself proposes only little endian for uncompressed files: a big endian
        # file leaves the modality as explicit little endian (a direct send does the same).
        expected = EXPLICIT_LE if syntax == BIG_ENDIAN else syntax
        assert relayed.file_meta.TransferSyntaxUID == expected, info["source"]
        for tag in set(original.keys()) | set(relayed.keys()):
            if tag == 0x00100020 or tag.element == 0 or tag == 0xFFFCFFFC:
                # PatientID is ruled; group lengths are retired; DCMTK drops Dataset Trailing
                # Padding (meaningless by definition) on the wire, in direct sends too.
                continue
            assert tag in relayed and tag in original, (info["source"], tag)
            if syntax == BIG_ENDIAN and tag == 0x7FE00010:
                assert relayed.PixelData == _swap16(original.PixelData)
                continue
            assert relayed[tag].value == original[tag].value, (info["source"], tag)
    wait_until(lambda: not spool_files(spool, "out"), 10, what="out/ emptied")
    _assert_spool_empty(spool)
    assert "PatientID: 'ORIG0' -> 'EG0000'" in relay.output()


def test_bad_files_are_quarantined_and_relay_keeps_serving(
        tmp_path: Path, orthanc: Orthanc, relay_setup: tuple[int, Path, RelayProcess]) -> None:
    port, spool, relay = relay_setup
    (spool / "incoming" / "notes.txt").write_text("not DICOM at all\n" * 10)
    data = bundled("CT_small.dcm").read_bytes()
    (spool / "incoming" / "cut.dcm").write_bytes(data[: len(data) // 2])
    wait_until(lambda: len([p for p in spool_files(spool, "failed")
                            if p.suffix != ".json"]) == 2, 20, what="2 quarantined")
    reasons = {}
    for sidecar in (spool / "failed").rglob("*.json"):
        info = json.loads(sidecar.read_text())
        reasons[sidecar.name.removesuffix(".json")] = info
        assert sidecar.with_name(sidecar.name.removesuffix(".json")).exists()
    assert reasons["notes.txt"]["reason"] == "not-dicom"
    assert reasons["cut.dcm"]["reason"] == "truncated"
    wait_until(lambda: "not-dicom" in relay.output() and "truncated" in relay.output(), 20,
               what="both quarantines in the log")

    uids = ct_series(tmp_path / "ct", 5, ethnic_group="AFTER")
    assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY").returncode == 0
    wait_until(lambda: orthanc.count() == 5, 30, what="relaying goes on")
    assert {t["PatientID"] for t in orthanc.tags_by_sop_uid().values()} == {"AFTER"}
    assert set(orthanc.tags_by_sop_uid()) == set(uids)


def test_destination_down_then_up_loses_nothing(tmp_path: Path, dcmtk: Path,
                                                engine: str) -> None:
    pacs = Orthanc(tmp_path / "pacs")  # configured, not started: the PACS is down
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "relay.toml", port=port, spool=spool,
                       destinations=[("central", pacs)], engine=engine)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        uids = ct_series(tmp_path / "ct", 20)
        assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(spool_files(spool, "out/central")) == 20, 30,
                   what="20 queued for the absent PACS")
        # Several retry rounds go by; nothing may be deleted meanwhile.
        wait_until(lambda: relay.output().count("unavailable") >= 3, 30, what="3 retries")
        assert len(spool_files(spool, "out/central")) == 20
        pacs.start()
        wait_until(lambda: pacs.count() == 20, 60, what="delivered once the PACS is up")
        assert set(pacs.tags_by_sop_uid()) == set(uids)
        wait_until(lambda: not spool_files(spool, "out"), 10, what="out/ emptied")
        _assert_spool_empty(spool)
    finally:
        assert relay.stop() == 0
        pacs.close()


def test_restart_sends_what_was_left_in_the_spool(tmp_path: Path, dcmtk: Path,
                                                  engine: str) -> None:
    pacs = Orthanc(tmp_path / "pacs")
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "relay.toml", port=port, spool=spool,
                       destinations=[("central", pacs)], engine=engine)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        uids = ct_series(tmp_path / "ct", 10)
        assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(spool_files(spool, "out/central")) == 10, 30, what="queued")
    finally:
        assert relay.stop() == 0
    pacs.start()
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        wait_until(lambda: pacs.count() == 10, 60, what="backlog delivered after restart")
        assert set(pacs.tags_by_sop_uid()) == set(uids)
    finally:
        assert relay.stop() == 0
        pacs.close()


def test_every_destination_gets_every_object(tmp_path: Path, dcmtk: Path, engine: str) -> None:
    a = Orthanc(tmp_path / "a", aet="PACSA").start()
    b = Orthanc(tmp_path / "b", aet="PACSB").start()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "relay.toml", port=port, spool=spool,
                       destinations=[("a", a), ("b", b)], engine=engine)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        uids = ct_series(tmp_path / "ct", 12, ethnic_group="BOTH")
        assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: a.count() == 12 and b.count() == 12, 60, what="both PACS")
        for pacs in (a, b):
            tags = pacs.tags_by_sop_uid()
            assert set(tags) == set(uids)
            assert {t["PatientID"] for t in tags.values()} == {"BOTH"}
        wait_until(lambda: not spool_files(spool, "out"), 10, what="out/ emptied")
        _assert_spool_empty(spool)
    finally:
        assert relay.stop() == 0
        a.close()
        b.close()


# Embedded engine only: DCMTK's storescp accepts any called AE title and has no option to
# check it (README: engines compared). dcm4che's `-b AET@…` does check it.
@pytest.mark.parametrize("engine", ["embedded"])
def test_wrong_called_ae_title_is_rejected(
        tmp_path: Path, orthanc: Orthanc, relay_setup: tuple[int, Path, RelayProcess]) -> None:
    port, spool, _relay = relay_setup
    ct_series(tmp_path / "ct", 1)
    result = dcmsend(sorted((tmp_path / "ct").iterdir()), port, "SOMEONEELSE")
    assert result.returncode != 0
    assert spool_files(spool, "incoming") == [] and spool_files(spool, "out") == []


@pytest.mark.parametrize("patient_values", [True, False])
def test_audit_log_tells_each_objects_story(tmp_path: Path, orthanc: Orthanc, dcmtk: Path,
                                            engine: str, patient_values: bool) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "relay.toml", port=port, spool=spool,
                       destinations=[("central", orthanc)], engine=engine,
                       extra=f"[audit]\npatient_values = {str(patient_values).lower()}\n")
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        uids = ct_series(tmp_path / "ct", 3, ethnic_group="SECRET-ID-42")
        assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY",
                       calling_aet="CT01").returncode == 0
        wait_until(lambda: orthanc.count() == 3, 30, what="delivered")
        audit = spool / "audit.jsonl"
        wait_until(lambda: audit.exists() and audit.read_text().count('"delivered"') == 3, 10,
                   what="audit lines")
    finally:
        assert relay.stop() == 0
    assert audit.stat().st_mode & 0o777 == 0o600, "the audit log holds patient values"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    by_object: dict[str, list[dict]] = {}
    for line in lines:
        by_object.setdefault(line["object"], []).append(line)
    assert len(by_object) == 3
    for steps in by_object.values():
        assert [s["step"] for s in steps] == ["received", "edited", "routed", "delivered"]
        received, edited, routed, delivered = steps
        assert routed["to"] == ["central"] and "not_to" not in routed
        assert received["calling_ae"] == "CT01" and received["sop_instance_uid"] in uids
        assert delivered["destination"] == "central" and delivered["status"] == "0x0000"
        if patient_values:
            assert edited["changes"] == [
                {"attribute": "PatientID", "before": "1CT1", "after": "SECRET-ID-42"}]
        else:
            assert edited["changes"] == [{"attribute": "PatientID"}]
    assert ("SECRET-ID-42" in audit.read_text()) is patient_values


def test_an_object_on_a_context_not_its_own_does_not_end_the_association(
        tmp_path: Path, orthanc: Orthanc, relay_setup: tuple[int, Path, RelayProcess]) -> None:
    """dcmsend misreads pydicom's rtdose_rle.dcm and sends it with SOP Class UID '31' on the
    RT Dose context. The object after it must still be stored (it used to fail: the embedded
    receiver aborted the association), and the odd one must end somewhere, with a reason."""
    port, spool, relay = relay_setup
    folder = tmp_path / "send"
    folder.mkdir()
    [ct_uid] = ct_series(folder / "ct", 1, ethnic_group="BEFORE")
    mr = folder / "mr.dcm"
    copy_with_new_uids(bundled("MR_small.dcm"), mr)
    mr_uid = _read_bytes(mr.read_bytes()).SOPInstanceUID
    [ct] = sorted((folder / "ct").iterdir())
    odd = folder / "rtdose_rle.dcm"
    odd.write_bytes(bundled("rtdose_rle.dcm").read_bytes())
    report = tmp_path / "report.txt"
    assert dcmsend([ct, odd, mr], port, "DICOMRELAY", report=report).returncode == 0
    statuses = dcmsend_statuses(report)
    assert statuses[ct.name].startswith("0x0000") and statuses[mr.name].startswith("0x0000"), \
        statuses
    wait_until(lambda: {ct_uid, mr_uid} <= set(orthanc.tags_by_sop_uid()), 60,
               what="the objects before and after it at Orthanc")
    wait_until(lambda: not any(spool_files(spool, f) for f in ("incoming", "work", "out")), 30,
               what="spool drained")
    # Nothing lost: each object the receiver acknowledged (by its SOP Instance UID) reached
    # Orthanc or waits in failed/ with a sidecar saying why.
    arrived = set(orthanc.tags_by_sop_uid())
    quarantined = [p for p in spool_files(spool, "failed") if p.suffix != ".json"]
    for path in quarantined:
        assert path.with_name(path.name + ".json").exists()
    kept = {str(_read_bytes(p.read_bytes()).SOPInstanceUID) for p in quarantined}
    by_name = {p.name: str(_read_bytes(p.read_bytes()).SOPInstanceUID) for p in (ct, odd, mr)}
    acknowledged = {by_name[name] for name, s in statuses.items() if s.startswith("0x0000")}
    assert acknowledged <= arrived | kept, (statuses, relay.output()[-2000:])
    assert "Traceback" not in relay.output()

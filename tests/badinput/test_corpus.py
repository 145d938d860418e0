"""Bad and hostile input, generated here: each object is either relayed as the rules say or
quarantined with a reason; the relay keeps serving; no file appears outside the spool; nothing
a DICOM value says is ever executed."""

from __future__ import annotations

import os
import struct
import uuid
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomdata import bundled, copy_with_new_uids, ct_series, multiframe_ct
from peers import (
    EG_RULE,
    ENGINES,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)

pytestmark = pytest.mark.e2e

MARKER = Path("/tmp") / f"dicom-relay-pwned-{uuid.uuid4().hex}"
# EthnicGroup values a hostile provider could send, and what PatientID must then be.
HOSTILE_VALUES = {
    "shell-subst": f"$(touch {MARKER})",
    "backticks": f"`touch {MARKER}`",
    "semicolon": f"x; touch {MARKER}",
    "pipe": f"x | touch {MARKER}",
    "xml-specials": "<a>&\"'",
    "cdata-end": "]]>",
    "spanish": "Núñez Ánxo",
    "japanese": "山田太郎",
}


def _with_ethnic_group(target: Path, value: object, *, charset: str = "ISO_IR 192",
                       sop_uid: str | None = None) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(bundled("CT_small.dcm"))
    uid = sop_uid or generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SpecificCharacterSet = charset
    ds.PatientID = "ORIGINAL"
    if value is None:
        if "EthnicGroup" in ds:
            del ds.EthnicGroup
    else:
        ds.EthnicGroup = value
    ds.save_as(target, enforce_file_format=False)
    return uid


def _drop(spool: Path, name: str, data: bytes) -> None:
    """Put a file into incoming/ the way a receiver does: written aside, renamed in."""
    tmp = spool / "incoming" / f".{name}.part"
    tmp.write_bytes(data)
    os.rename(tmp, spool / "incoming" / name)


def _broken_files() -> dict[str, bytes]:
    ct = bundled("CT_small.dcm").read_bytes()
    jpeg2000 = bundled("JPEG2000.dcm").read_bytes()
    no_preamble = ct[132:]  # the data set without preamble and 'DICM'
    bad_length = bytearray(ct)
    # Make the first data set element after the meta claim 0x7FFFFFF0 bytes.
    meta_end = 132 + 12 + struct.unpack("<I", ct[140:144])[0]
    bad_length[meta_end + 6:meta_end + 8] = b"\xf0\x7f"  # explicit VR: 2-byte length
    bad_length[meta_end + 4:meta_end + 6] = b"UN"  # then a 4-byte length form
    bad_length[meta_end + 8:meta_end + 12] = struct.pack("<I", 0x7FFFFFF0)
    wrong_vr = bytearray(ct)
    # StudyDate (0008,0020) DA, 8 bytes, re-declared as US: four 16-bit numbers.
    at = ct.index(b"\x08\x00\x20\x00DA")
    wrong_vr[at + 4:at + 6] = b"US"
    return {
        "wrong-vr.dcm": bytes(wrong_vr),
        "notes.txt": b"this is not DICOM\n" * 100,
        "empty.dcm": b"",
        "cut-in-meta.dcm": ct[:150],
        "cut-in-header.dcm": ct[:700],
        "cut-in-pixels.dcm": ct[:-1000],
        "cut-in-encapsulated.dcm": jpeg2000[:-10],
        "no-preamble.dcm": no_preamble,
        "bad-length.dcm": bytes(bad_length),
    }


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_and_hostile_input(tmp_path: Path, dcmtk: Path, engine: str) -> None:
    sink = ScriptedSCP()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("sink", "SCRIPTED", sink.port)], rules=EG_RULE)
    before = {p for p in tmp_path.rglob("*")}
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        # 1. Hostile and odd values, sent over the network like any study.
        sent = tmp_path / "sent"
        sent.mkdir()
        expected: dict[str, object] = {}
        for name, value in HOSTILE_VALUES.items():
            expected[_with_ethnic_group(sent / f"{name}.dcm", value)] = value
        expected[_with_ethnic_group(sent / "absent.dcm", None)] = "ORIGINAL"  # keep
        expected[_with_ethnic_group(sent / "empty.dcm", "")] = "ORIGINAL"  # keep
        expected[_with_ethnic_group(sent / "multi.dcm", ["A", "B"])] = ["A", "B"]
        long_value = "L" * 100  # longer than PatientID (LO, 64) allows: copied as is
        expected[_with_ethnic_group(sent / "long.dcm", long_value)] = long_value
        deflated = sent / "deflated.dcm"
        expected[copy_with_new_uids(bundled("image_dfl.dcm"), deflated)] = None
        result = dcmsend(sorted(sent.iterdir()), port, "DICOMRELAY")
        assert result.returncode == 0, result.stderr

        # 2. Broken files, as a toolkit receiver or an administrator might leave them.
        broken = _broken_files()
        for name, data in broken.items():
            _drop(spool, name, data)
        # A wrong VR is still a readable object: relayed as the rule says, VR and all.
        relayable = {"wrong-vr.dcm": "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"}
        for name in relayable:
            del broken[name]
        # A huge multi-frame object (120 MB) goes through like any other.
        huge = sent / "huge.dcm"
        expected[multiframe_ct(huge, 120, ethnic_group="HUGE")] = "HUGE"
        assert dcmsend([huge], port, "DICOMRELAY").returncode == 0

        wait_until(lambda: set(sink.counts()) >= set(expected) | set(relayable.values()), 120,
                   what="the good ones")
        wait_until(lambda: len([p for p in spool_files(spool, "failed")
                                if p.suffix != ".json"]) == len(broken), 60,
                   what="every broken file quarantined")
        for uid, value in expected.items():
            got = sink.patient_ids[uid]
            if value is not None:
                assert (list(got) if isinstance(value, list) else got) == value, uid
        reasons = {p.name.removesuffix(".json"): p.parent.name
                   for p in (spool / "failed").rglob("*.json")}
        assert set(reasons) == set(broken)
        assert reasons["notes.txt"] == "not-dicom" and reasons["empty.dcm"] == "not-dicom"
        assert reasons["cut-in-pixels.dcm"] == "truncated"
        assert reasons["cut-in-encapsulated.dcm"] in {"truncated", "unreadable"}
        assert reasons["no-preamble.dcm"] == "not-dicom"
        for name in ("cut-in-meta.dcm", "cut-in-header.dcm", "bad-length.dcm"):
            assert reasons[name] in {"not-dicom", "truncated", "unreadable"}, name

        # 3. And it keeps serving.
        uids = ct_series(tmp_path / "after", 5, ethnic_group="STILL-HERE")
        assert dcmsend(sorted((tmp_path / "after").iterdir()), port, "DICOMRELAY"
                       ).returncode == 0
        wait_until(lambda: set(sink.counts()) >= set(uids), 30, what="relaying goes on")
    finally:
        relay.stop()
        sink.close()
    assert not MARKER.exists(), "a DICOM value was executed"
    outside = {p for p in tmp_path.rglob("*") if spool not in p.parents and p != spool} - before
    allowed = {tmp_path / "sent", tmp_path / "after", tmp_path / "relay-run.log"}
    assert {p for p in outside if not any(a == p or a in p.parents for a in allowed)} == set()

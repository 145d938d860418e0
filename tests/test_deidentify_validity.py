"""De-identified copies an archive accepts: every bundled pydicom file (test_files and
charset_files) through a de-identified destination on the embedded engine, a representative
set on DCMTK and dcm4che. Real peers: DCMTK's dcmsend as the modality, DCMTK's storescp
(+xa) as the research archive.

The validator is dciodvfy (dicom3tools, David Clunie's): it knows the IODs and their
modules, so it sees a Type 1 attribute removed, a Type 2 one gone, a condition broken, a
value invalid for its VR. A copy may carry the errors its original had (pydicom's files
are not all valid), never a new one. What else is checked on every copy: its dates moved by
the patient's keyed offset (the intervals between a study's dates kept), no identifying
value of the original left anywhere in it, and nothing that may carry burned-in text
delivered (those are in failed/burned-in/).
"""

from __future__ import annotations

import collections
import datetime
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from peers import (
    ENGINES,
    DcmtkStoreSCP,
    RelayProcess,
    dcmsend,
    dcmsend_statuses,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)
from relay.edit.burnedin import burned_in_risk
from relay.edit.deidentify import Deidentifier

pytestmark = pytest.mark.e2e

DCIODVFY = shutil.which("dciodvfy")
SECRET = b"validity-test-secret-0123456789abcdef"
# One of each kind, for the toolkit engines: CT, MR big endian, an SR, RT plan and dose
# (multi-frame), a waveform, odd character sets, JPEG 2000, and secondary captures and an
# ultrasound to redact (RLE multi-frame, JPEG, big endian).
REPRESENTATIVE = ["CT_small.dcm", "MR_small_bigendian.dcm", "test-SR.dcm", "rtplan.dcm",
                  "rtdose.dcm", "waveform_ecg.dcm", "chrH31.dcm", "chrX1.dcm", "JPEG2000.dcm",
                  "SC_rgb_rle_2frame.dcm", "SC_rgb_small_odd_jpeg.dcm", "ExplVR_BigEnd.dcm"]
REDACT = ('[{ SOPClassUID = "1.2.840.10008.5.1.4.1.1.7", regions = [[0, 0, 4, 2]] }, '
          '{ Modality = "US", regions = [[0, 0, 4, 2]] }]')
# Why a file the relay received may not be delivered: bad input (test_corpus.py's matter)
# and text that may be burned in.
ALLOWED_REASONS = {"burned-in", "truncated", "not-dicom", "no-file-meta", "unreadable",
                   "not-sendable"}


def _read(path: Path, **kwargs: Any):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path, **kwargs)


def bundled() -> list[Path]:
    """Every file pydicom ships that has a SOP Instance UID to follow (from its folders:
    get_testdata_files() would try to download more)."""
    data = Path(pydicom.data.__file__).parent
    found = []
    for path in sorted([*(data / "test_files").iterdir(), *(data / "charset_files").iterdir()]):
        if not path.is_file():
            continue
        try:
            ds = _read(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001, S112 - not a DICOM file: nothing to de-identify
            continue
        if ds.get("SOPInstanceUID"):
            found.append(path)
    return found


def rounds(files: list[Path]) -> list[list[Path]]:
    """The files in rounds of distinct SOP Instance UIDs (pydicom ships one instance in many
    encodings: MR_small in nine); the archive stores by UID."""
    groups: dict[str, list[Path]] = collections.defaultdict(list)
    for path in files:
        groups[str(_read(path, stop_before_pixels=True).SOPInstanceUID)].append(path)
    depth = max(len(g) for g in groups.values())
    return [[g[i] for g in groups.values() if len(g) > i] for i in range(depth)]


def validator_errors(path: Path, scratch: Path) -> collections.Counter[str]:
    """dciodvfy's errors, each as where + what (the value it quotes left out: a replaced UID
    or date makes the same error read differently). A deflated file, which dciodvfy cannot
    read past its meta, is validated inflated (a copy in `scratch`)."""
    assert DCIODVFY is not None
    ds = _read(path, stop_before_pixels=True)
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        inflated = scratch / f"{path.name}.inflated"
        ds = _read(path)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(inflated, enforce_file_format=True)
        path = inflated
    result = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True,
                            errors="replace", timeout=120, check=False)
    lines = (result.stdout + result.stderr).splitlines()
    return collections.Counter(re.sub(r"= <[^>]*>", "= <>", " ".join(line.split()))
                               for line in lines if line.startswith("Error"))


def _day(text: str) -> datetime.date | None:
    try:
        return datetime.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def date_shifts(original: Any, copy: Any) -> set[int]:
    """The days each top-level date moved by (the birth date is emptied, not moved)."""
    shifts = set()
    for element in original:
        if element.VR not in ("DA", "DT") or element.keyword in ("PatientBirthDate", ""):
            continue
        before = _day(str(element.value or ""))
        after = _day(str(copy.get(element.keyword, "") or ""))
        if before is not None and after is not None:
            shifts.add((after - before).days)
    return shifts


def identifying_values(ds: Any) -> list[str]:
    """The original's values that name the patient, the place or the physician, wherever
    they are in it (long enough not to occur by chance; not a part of the device's maker,
    which the profile keeps: MR_small's InstitutionName is TOSHIBA)."""
    values: set[str] = set()
    kept = " ".join(str(ds.get(k, "") or "") for k in ("Manufacturer",
                                                        "ManufacturerModelName"))
    for element in ds.iterall():
        if element.keyword in ("PatientName", "PatientID", "OtherPatientIDs",
                               "AccessionNumber", "InstitutionName",
                               "ReferringPhysicianName") and element.value:
            values |= {p for p in re.split(r"[\^=\\]+", str(element.value))
                       if len(p.strip()) >= 4 and p not in kept}
    return sorted(values)


@pytest.fixture(scope="module")
def validator() -> str:
    if DCIODVFY is None:
        pytest.skip("dciodvfy missing (Debian package dicom3tools; tests/run installs it)")
    return DCIODVFY


@pytest.mark.parametrize("engine", ENGINES)
def test_every_deidentified_copy_is_as_valid_as_its_original(
        tmp_path: Path, dcmtk: Path, validator: str, engine: str) -> None:
    files = bundled() if engine == "embedded" else [
        p for p in bundled() if p.name in REPRESENTATIVE]
    assert len(files) > (80 if engine == "embedded" else 11)
    (tmp_path / "deid.key").write_bytes(SECRET)
    rule = Deidentifier(SECRET)
    archive = DcmtkStoreSCP(tmp_path / "archive", aet="RESEARCH")
    port = free_port()
    spool = tmp_path / "spool"
    # pydicom ships many secondary captures and ultrasounds without BurnedInAnnotation: a
    # redact rule blanks a corner of theirs, so that they arrive too, in every codec.
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("research", "RESEARCH", archive.port,
                                      f'[[destinations.rules]]\ndeidentify = "basic"\n'
                                      f'secret_file = "{tmp_path / "deid.key"}"\n'
                                      f'[[destinations.rules]]\nredact = {REDACT}')])
    relay = RelayProcess(cfg, tmp_path).start(port)
    delivered: dict[Path, Path] = {}  # original -> the copy the archive stored
    quarantined: dict[Path, tuple[str, str]] = {}  # original -> (reason, detail)
    seen_failed: set[Path] = set()
    try:
        for n, batch in enumerate(rounds(files)):
            report = tmp_path / f"round{n}.txt"
            dcmsend(batch, port, "DICOMRELAY", report=report)
            statuses = dcmsend_statuses(report)
            sent = [p for p in batch if statuses.get(p.name, "").startswith("0x0000")]
            by_copy_uid = {rule.uid(str(_read(p, stop_before_pixels=True).SOPInstanceUID)): p
                           for p in sent}
            by_uid = {str(_read(p, stop_before_pixels=True).SOPInstanceUID): p for p in sent}

            def settled(by_copy_uid: dict[str, Path] = by_copy_uid,
                        by_uid: dict[str, Path] = by_uid, sent: list[Path] = sent) -> bool:
                for stored in archive.stored():
                    uid = str(_read(stored, stop_before_pixels=True).SOPInstanceUID)
                    if uid in by_copy_uid and by_copy_uid[uid] not in delivered:
                        kept = tmp_path / "arrived" / f"{len(delivered)}.dcm"
                        kept.parent.mkdir(exist_ok=True)
                        shutil.move(stored, kept)
                        delivered[by_copy_uid[uid]] = kept
                for failed in spool_files(spool, "failed"):
                    if failed.suffix == ".json" or failed in seen_failed:
                        continue
                    seen_failed.add(failed)
                    uid = str(_read(failed, stop_before_pixels=True, force=True)
                              .get("SOPInstanceUID", ""))
                    if uid in by_uid:
                        sidecar = failed.with_name(failed.name + ".json")
                        detail = json.loads(sidecar.read_text())["detail"] \
                            if sidecar.exists() else ""
                        quarantined[by_uid[uid]] = (failed.parent.name, detail)
                return all(p in delivered or p in quarantined for p in sent)

            wait_until(settled, 120, what=f"round {n}: every object delivered or set aside")
    finally:
        assert relay.stop() == 0
        archive.close()

    problems: list[str] = []
    for original, copy in sorted(delivered.items()):
        before, after = _read(original), _read(copy)
        new = validator_errors(copy, tmp_path) - validator_errors(original, tmp_path)
        problems += [f"{original.name}: {error}" for error in new]
        pid = str(before.get("PatientID", "") or "")
        shifts = date_shifts(before, after)
        if shifts and shifts != {rule.date_shift(pid).days}:
            problems.append(f"{original.name}: dates moved by {shifts}, the patient's offset "
                            f"is {rule.date_shift(pid).days}")
        text = str(after)
        problems += [f"{original.name}: {value!r} left in the copy"
                     for value in identifying_values(before) if value in text]
        if burned_in_risk(before) is not None:  # arrived only once the rule blanked it
            corner = after.pixel_array[..., 0:2, 0:4, :] if after.get("SamplesPerPixel", 1) > 1 \
                else after.pixel_array[..., 0:2, 0:4]
            if after.get("BurnedInAnnotation") != "NO" or corner.any():
                problems.append(f"{original.name}: delivered without its corner blanked, but "
                                f"{burned_in_risk(before)}")
    for original, (reason, detail) in sorted(quarantined.items()):
        # A redaction fails only where no decoder reads the pixels (a broken JPEG 2000).
        if reason not in ALLOWED_REASONS and not (
                reason == "redact-failed" and "cannot decode" in detail):
            problems.append(f"{original.name}: set aside as {reason}: {detail}")
        if reason == "burned-in" and burned_in_risk(_read(original)) is None:
            problems.append(f"{original.name}: set aside as burned-in without a reason")
    assert problems == [], "\n".join(problems)
    # All but the broken ones go through, the secondary captures and ultrasounds redacted.
    assert len(delivered) > len(files) * 0.8, sorted(quarantined.items())
    audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
    assert any(a["step"] == "redacted" and "blanked [0, 0, 4, 2]" in a["done"] for a in audit)


def _pixels(path: Path) -> Any:
    ds = _read(path)
    ds.pixel_array_options(as_rgb=False)
    return ds.pixel_array


def test_burned_in_text_is_held_back_unless_a_redact_rule_blanks_it(
        tmp_path: Path, dcmtk: Path) -> None:
    """An ultrasound and a secondary capture without BurnedInAnnotation: a de-identified
    destination does not get them (failed/burned-in/); one whose rules redact them gets them
    with the regions' pixels zero and every other pixel as sent, the SC still RLE. A CT, and
    an ultrasound that says NO, go to both."""
    from dicomdata import bundled, copy_with_new_uids

    study = tmp_path / "study"
    us, sc, ct, us_no = (study / f"{n}.dcm" for n in ("us", "sc", "ct", "us-no"))
    copy_with_new_uids(bundled("examples_rgb_color.dcm"), us)  # 240 x 320 RGB
    copy_with_new_uids(bundled("SC_rgb_rle.dcm"), sc)  # 100 x 100 RGB, RLE
    copy_with_new_uids(bundled("CT_small.dcm"), ct)
    copy_with_new_uids(bundled("examples_rgb_color.dcm"), us_no)
    for path, maker, flag in ((us, "ACME Ultrasound", None), (sc, "ACME Capture", None),
                              (us_no, "ACME Ultrasound", "NO")):
        ds = _read(path)
        ds.Manufacturer = maker
        if flag is None:
            ds.pop("BurnedInAnnotation", None)
        else:
            ds.BurnedInAnnotation = flag
        ds.save_as(path, enforce_file_format=True)
    (tmp_path / "deid.key").write_bytes(SECRET)
    deid = f'[[destinations.rules]]\ndeidentify = "basic"\nsecret_file = "{tmp_path / "deid.key"}"'
    redact = ('[[destinations.rules]]\nredact = [\n'
              '  { Modality = "US", Manufacturer = "ACME*", Rows = 240, Columns = 320, '
              'regions = [[0, 0, 320, 30]] },\n'
              '  { SOPClassUID = "1.2.840.10008.5.1.4.1.1.7", Rows = 100, Columns = 100, '
              'regions = [[10, 80, 50, 20], [0, 0, 5, 5]] }]')
    plain, redacting = (DcmtkStoreSCP(tmp_path / n, aet=n.upper()) for n in ("plain", "redacts"))
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, destinations=[
        ("plain", "PLAIN", plain.port, deid),
        ("redacts", "REDACTS", redacting.port, f"{deid}\n{redact}")])
    relay = RelayProcess(cfg, tmp_path).start(port)
    rule = Deidentifier(SECRET)
    copy_uid = {name: rule.uid(str(_read(p).SOPInstanceUID))
                for name, p in (("us", us), ("sc", sc), ("ct", ct), ("us-no", us_no))}
    try:
        assert dcmsend([us, sc, ct, us_no], port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(redacting.stored()) == 4 and len(plain.stored()) == 2, 60,
                   what="4 copies at the redacting destination, 2 at the other")
        wait_until(lambda: len(spool_files(spool, "failed/burned-in")) == 4, 30,
                   what="the US and the SC set aside for the plain destination")
    finally:
        assert relay.stop() == 0
        plain.close()
        redacting.close()
    assert plain.sop_uids() == {copy_uid["ct"], copy_uid["us-no"]}
    sidecars = [json.loads(p.read_text()) for p in spool_files(spool, "failed/burned-in")
                if p.suffix == ".json"]
    assert {s["destination"] for s in sidecars} == {"plain"}
    assert all("BurnedInAnnotation is absent" in s["detail"] for s in sidecars), sidecars
    arrived = {str(_read(p).SOPInstanceUID): p for p in redacting.stored()}
    assert set(arrived) == set(copy_uid.values())
    for name, original, regions in (("us", us, [(0, 0, 320, 30)]),
                                    ("sc", sc, [(10, 80, 50, 20), (0, 0, 5, 5)])):
        got = _read(arrived[copy_uid[name]])
        assert got.BurnedInAnnotation == "NO", name
        before, after = _pixels(original), _pixels(arrived[copy_uid[name]])
        blanked = np.zeros(before.shape[:2], dtype=bool)
        for x, y, w, h in regions:
            blanked[y:y + h, x:x + w] = True
        assert not after[blanked].any(), f"{name}: the regions are black"
        assert np.array_equal(after[~blanked], before[~blanked]), f"{name}: the rest as sent"
    assert str(_read(arrived[copy_uid["sc"]]).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.5"
    # The ultrasound that says NO: as sent where nothing redacts; a redact rule that matches
    # it blanks it all the same (the rule describes the device, the flag may be wrong).
    [plain_us] = [p for p in plain.stored() if str(_read(p).SOPInstanceUID) == copy_uid["us-no"]]
    assert np.array_equal(_pixels(plain_us), _pixels(us_no))
    audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
    redacted = sorted(a["done"] for a in audit if a["step"] == "redacted")
    assert redacted == ["blanked [0, 0, 320, 30] in 1 frame(s) of 320x240"] * 2 + [
        "blanked [10, 80, 50, 20], [0, 0, 5, 5] in 1 frame(s) of 100x100"]

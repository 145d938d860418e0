"""The in-process DICOM ⇄ PS3.19 converter over every file pydicom's wheel ships."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement

from dicomdata import bundled, readable_bundled_files
from relay.edit.dicomxml import dataset_to_xml
from relay.edit.editor import BadInput, Editor, read_dicom
from relay.edit.rules import KeywordRule, XPathRule

FILES = readable_bundled_files()
RULES = [
    KeywordRule("PatientID", value="RELAY-ID"),
    # A PN rewrite through XPath: exercises re-encoding in the file's own character set.
    XPathRule("/NativeDicomModel/DicomAttribute[@keyword='PatientName']"
              "/PersonName[1]/Alphabetic/FamilyName", value="Núñez"),
]
RULED = {0x00100020, 0x00100010}


def _read(path: Path):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def _raw_bytes(ds, tag: int) -> bytes | None:  # noqa: ANN001
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement):
        return elem.value
    return None


def _can_encode(text: str, charset: object) -> bool:
    values = [] if not charset else [charset] if isinstance(charset, str) else list(charset)
    encodings = convert_encodings(values or ["ISO_IR 6"])
    return any(_try(text, e) for e in encodings)


def _try(text: str, encoding: str) -> bool:
    try:
        text.encode(encoding)
    except UnicodeError:
        return False
    return True


def test_the_corpus_is_real() -> None:
    # The round trip below must cover a real variety, not an empty list.
    names = {p.name for p in FILES}
    assert len(FILES) >= 60
    assert {"CT_small.dcm", "JPEG2000.dcm", "MR_small_bigendian.dcm", "chrH31.dcm",
            "chrFren.dcm"} <= names


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_round_trip_changes_only_ruled_attributes(path: Path, tmp_path: Path) -> None:
    out = tmp_path / "edited.dcm"
    before = _read(path)
    try:
        outcome = Editor(RULES).edit(path, out)
    except BadInput as exc:
        # Only deliberately broken files may be refused, and files whose character set
        # cannot hold the new name (never written with '?' in its place).
        if exc.reason == "truncated":
            assert "truncated" in path.name
        else:
            assert exc.reason == "rule-error" and "cannot encode" in exc.detail, exc
            assert not _can_encode("Núñez", before.get("SpecificCharacterSet"))
        return
    after = _read(out)
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    assert after.PatientID == "RELAY-ID"
    assert {c.path for c in outcome.changes} <= {"PatientID", "PatientName"}
    if "PatientName" in before and before.PatientName.family_name:
        assert after.PatientName.family_name == "Núñez"
        # The other name groups (ideographic, phonetic) survive in the file's charset.
        assert after.PatientName.components[1:] == before.PatientName.components[1:]
    assert after.get("SpecificCharacterSet") == before.get("SpecificCharacterSet")
    tags = set(before.keys()) | set(after.keys())
    for tag in sorted(tags):
        if tag in RULED:
            continue
        if tag.element == 0x0000:
            continue  # group lengths: retired, pydicom drops them when writing (correctly)
        assert tag in before and tag in after, f"{tag} added or lost"
        raw_b, raw_a = _raw_bytes(before, tag), _raw_bytes(after, tag)
        if raw_b is not None and raw_a is not None and before.get_item(tag).VR != "SQ":
            # Untouched elements keep their exact bytes (pixel data, private tags, ...).
            assert raw_a == raw_b, f"{tag} bytes changed"
        else:
            assert after[tag].value == before[tag].value, f"{tag} value changed"


def test_bulk_data_never_becomes_text() -> None:
    ds = read_dicom(bundled("JPEG2000.dcm"))
    root = dataset_to_xml(ds)
    pixel = root.xpath("//DicomAttribute[@tag='7FE00010']")[0]
    assert pixel.find("BulkData") is not None
    assert pixel.find("InlineBinary") is None and pixel.find("Value") is None


def test_japanese_person_name_in_xml() -> None:
    root = dataset_to_xml(read_dicom(bundled("chrH31.dcm")))
    pn = root.xpath("//DicomAttribute[@keyword='PatientName']/PersonName")[0]
    assert pn.findtext("Alphabetic/FamilyName") == "Yamada"
    assert pn.findtext("Ideographic/FamilyName") == "山田"
    assert pn.findtext("Phonetic/GivenName") == "たろう"


def test_private_tags_carry_their_creator() -> None:
    root = dataset_to_xml(read_dicom(bundled("CT_small.dcm")))
    private = root.xpath("//DicomAttribute[@privateCreator]")
    assert private, "CT_small has GE private tags"
    for node in private:
        tag = int(node.get("tag"), 16)
        assert (tag >> 16) % 2 == 1 and (tag & 0xFFFF) >= 0x1000
    assert {"GEMS_IDEN_01", "GEMS_ACQU_01"} <= {p.get("privateCreator") for p in private}


# Cuts inside the meta, inside an element header, inside a value, inside a deferred value.
@pytest.mark.parametrize("cut", [0, 60, 200, 700, 5000, -100, -1])
def test_truncated_or_not_dicom_is_refused(cut: int, tmp_path: Path) -> None:
    data = bundled("CT_small.dcm").read_bytes()
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(data[:cut] if cut else b"")
    with pytest.raises(BadInput) as info:
        read_dicom(broken)
    assert info.value.reason in {"not-dicom", "truncated", "unreadable"}


def test_text_file_is_not_dicom(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("this is not DICOM\n" * 20)
    with pytest.raises(BadInput) as info:
        read_dicom(text)
    assert info.value.reason == "not-dicom"


@pytest.mark.parametrize("cut_from_end", [4, 10, 500])
def test_truncated_encapsulated_pixel_data_is_refused(cut_from_end: int, tmp_path: Path) -> None:
    # JPEG 2000: undefined-length pixel data; the cut removes its closing delimiter.
    data = bundled("JPEG2000.dcm").read_bytes()
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(data[:-cut_from_end])
    with pytest.raises(BadInput) as info:
        read_dicom(broken)
    assert info.value.reason in {"truncated", "unreadable"}


def test_splice_and_full_rewrite_agree(tmp_path: Path) -> None:
    # The fast path (splicing the changed elements into the original file) and pydicom's full
    # rewrite must produce the same object.
    import relay.edit.editor as edit_module

    src = bundled("CT_small.dcm")
    rule = [KeywordRule("PatientID", value="A-MUCH-LONGER-PATIENT-IDENTIFIER"),
            KeywordRule("InstitutionName", delete=True),
            KeywordRule("AccessionNumber", value="ACC1")]  # absent before: inserted
    spliced, rewritten = tmp_path / "spliced.dcm", tmp_path / "rewritten.dcm"
    Editor(rule).edit(src, spliced)
    original = edit_module.splice_file
    edit_module.splice_file = lambda *a, **k: False  # force the full rewrite
    try:
        Editor(rule).edit(src, rewritten)
    finally:
        edit_module.splice_file = original
    a, b = _read(spliced), _read(rewritten)
    assert a.PatientID == "A-MUCH-LONGER-PATIENT-IDENTIFIER" and "InstitutionName" not in a
    assert a.AccessionNumber == "ACC1"
    # (A pydicom Dataset iterates over elements, not tags: hence keys().)
    tags_a = {t for t in set(a.keys()) if t.element}
    assert tags_a == {t for t in set(b.keys()) if t.element}
    for tag in tags_a:
        assert a[tag].value == b[tag].value, tag
    # Untouched bytes are the original's: the pixel data ends the file in both.
    assert spliced.read_bytes()[-1000:] == src.read_bytes()[-1000:]

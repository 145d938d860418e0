"""The element walk that proves a file holds all it declares (relay/scan.py), against every
file pydicom's wheel carries and those files cut short."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom.filereader import read_partial

from dicomdata import bundled, readable_bundled_files
from relay.edit.editor import BadInput, read_dicom
from relay.edit.scan import Unsure, find_cut

DEFLATED = "1.2.840.10008.1.2.1.99"


def _start_and_encoding(path: Path) -> tuple[int, bool, bool, dict[int, tuple[int, int]]]:
    """Where the data set starts, its encoding, and the top-level elements' extents as
    pydicom reads them: {start: end} for those with a defined length."""
    with open(path, "rb") as fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_partial(fp, stop_when=lambda tag, vr, length: True)
        start = fp.tell()
        fp.seek(0)
        whole = read_partial(fp, defer_size=1)
    implicit, little = ds.original_encoding
    extents = {}
    for tag in whole.keys():  # noqa: SIM118 - a Dataset iterates elements, not tags
        raw = whole.get_item(tag, keep_deferred=True)
        if getattr(raw, "length", 0xFFFFFFFF) != 0xFFFFFFFF and raw.value_tell is not None:
            extents[raw.value_tell] = raw.value_tell + raw.length
    return start, bool(implicit), bool(little), extents


FILES = [p for p in readable_bundled_files()
         if str(read_partial(open(p, "rb"), stop_when=lambda *a: True)  # noqa: SIM115
                .file_meta.get("TransferSyntaxUID", "")) != DEFLATED]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_whole_files_are_not_cut(path: Path) -> None:
    start, implicit, little, _ = _start_and_encoding(path)
    try:
        cut = find_cut(path, start, implicit, little)
    except Unsure:
        return  # the caller then judges with pydicom, as before the walk existed
    if cut is not None:
        # A file pydicom reads may still be short: then read_dicom must call it truncated
        # with the walk and without it (the old check on the last element) alike.
        with pytest.raises(BadInput, match="truncated"):
            read_dicom(path)


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "rtplan.dcm",
    "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "UN_sequence.dcm",
    "nested_priv_SQ.dcm", "test-SR.dcm", "waveform_ecg.dcm"])
def test_files_cut_short_are_found(tmp_path: Path, name: str) -> None:
    source = bundled(name)
    data = source.read_bytes()
    start, implicit, little, _ = _start_and_encoding(source)
    assert find_cut(source, start, implicit, little) is None
    for keep in sorted({len(data) - 1, len(data) - 7, len(data) - 100,
                        start + (len(data) - start) // 2, start + 3}):
        cut = tmp_path / f"cut-{keep}.dcm"
        cut.write_bytes(data[:keep])
        ends = {end for end in _start_and_encoding(source)[3].values()}
        if keep in ends:
            continue  # exactly at an element boundary: undetectable by design
        found = find_cut(cut, start, implicit, little)
        assert found is not None, f"{name} cut to {keep} of {len(data)} bytes"
        assert f"ends at byte {keep}" in found.detail


def test_read_dicom_up_to_the_ruled_tags_still_finds_cuts(tmp_path: Path) -> None:
    data = bundled("CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-10])
    for up_to in (None, 0x00102160):
        with pytest.raises(BadInput, match="truncated"):
            read_dicom(cut, up_to)
    whole = read_dicom(bundled("CT_small.dcm"), 0x00102160)
    assert "PatientID" in whole and "PixelData" not in whole  # decoded only that far


@pytest.mark.parametrize("path", readable_bundled_files(), ids=lambda p: p.name)
def test_leading_values_agree_with_pydicom(path: Path) -> None:
    # The DCMTK sender's check of every object's SOP UIDs reads only the first bytes; where
    # it answers, it must answer what pydicom reads.
    from relay.edit.scan import leading_values

    found = leading_values(path, {0x00080016, 0x00080018})
    if found is None:
        return  # not laid out for a quick answer: the caller asks pydicom
    with open(path, "rb") as fp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = read_partial(fp, stop_when=lambda tag, vr, length: tag > 0x00080018)
    syntax, values = found
    assert syntax == ds.file_meta.TransferSyntaxUID
    for tag in (0x00080016, 0x00080018):
        if tag in ds:
            assert values[tag].rstrip(b"\x00 ").decode() == str(ds[tag].value)
        else:
            assert tag not in values


@pytest.mark.parametrize("path", readable_bundled_files(), ids=lambda p: p.name)
def test_read_outgoing_answers_what_pydicom_reads(path: Path) -> None:
    # The senders name each file's SOP class, instance and transfer syntax from its file meta,
    # read without pydicom where the head allows (file_meta_values): the same answer, or the
    # same failure, as pydicom's read_file_meta_info.
    from pydicom.filereader import read_file_meta_info

    from relay.send.results import Outcome, read_outgoing

    ready, failed = read_outgoing([path])
    try:
        meta = read_file_meta_info(path)
        expected = (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
                    str(meta.TransferSyntaxUID))
    except Exception:  # noqa: BLE001 - pydicom cannot: neither may read_outgoing
        assert not ready
        assert [r.outcome for r in failed] == [Outcome.FAILED]
        return
    assert not failed
    assert [(o.sop_class_uid, o.sop_instance_uid, o.transfer_syntax) for o in ready] == [expected]


@pytest.mark.parametrize("keep", [0, 100, 131, 139, 150, 170, 190, 210, 260])
def test_read_outgoing_of_a_head_cut_short_fails_as_pydicom_does(tmp_path: Path,
                                                                 keep: int) -> None:
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(bundled("CT_small.dcm").read_bytes()[:keep])
    test_read_outgoing_answers_what_pydicom_reads(cut)

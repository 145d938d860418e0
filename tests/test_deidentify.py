"""De-identification at unit level: the Basic Profile's table applied, the keyed values
consistent, and the options (keep, retain_dates, clean_descriptions). End to end, across a
restart and on every engine: test_routing_e2e.py."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import IDENTIFYING, identified_study
from relay.edit.deidentify import Deidentifier, profile_attributes
from relay.route.router import DestinationEdits

SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    identified_study(tmp_path / "study", [2, 1])
    return sorted((tmp_path / "study").rglob("*.dcm"))


def _read(path: Path):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def _deid(path: Path, rule: Deidentifier):  # noqa: ANN202
    ds = _read(path)
    rule.apply(ds)
    return ds


def test_the_profile_table_is_the_standards(study: list[Path]) -> None:
    profile = profile_attributes()
    # A few rows of PS3.15 Table E.1-1 as the standard gives them.
    assert profile["PatientName"] == "Z" and profile["StudyInstanceUID"] == "U"
    assert profile["InstitutionName"].startswith("X") and profile["PatientBirthDate"] == "Z"
    ds = _deid(study[0], Deidentifier(SECRET))
    original = _read(study[0])
    for keyword, action in profile.items():
        if keyword in original and original[keyword].value not in (None, "") and \
                action != "K" and keyword in ds and ds[keyword].VR != "TM":  # times stay
            assert str(ds[keyword].value) != str(original[keyword].value), keyword
    assert ds.PatientIdentityRemoved == "YES"
    # Dates are shifted (the Modified Dates option's codes say so), the birth date emptied.
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
    assert ds.PatientBirthDate in ("", None) and len(ds.StudyDate) == 8
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert not any(e.tag.is_private for e in ds)
    assert ds.PixelData == original.PixelData


def test_replacements_are_keyed_consistent_and_secret_bound(study: list[Path]) -> None:
    rule = Deidentifier(SECRET)
    a, b, c = (_deid(p, rule) for p in study)
    assert a.StudyInstanceUID == b.StudyInstanceUID == c.StudyInstanceUID
    assert a.SeriesInstanceUID == b.SeriesInstanceUID != c.SeriesInstanceUID
    assert a.PatientID == b.PatientID == c.PatientID != IDENTIFYING["PatientID"]
    assert len({a.SOPInstanceUID, b.SOPInstanceUID, c.SOPInstanceUID}) == 3
    # The same object tomorrow (a new process, the same secret): the same values.
    again = _deid(study[0], Deidentifier(SECRET))
    assert again.SOPInstanceUID == a.SOPInstanceUID and again.PatientID == a.PatientID
    # Another secret: nothing in common.
    other = _deid(study[0], Deidentifier(b"another secret, 32 bytes long!!"))
    assert other.StudyInstanceUID != a.StudyInstanceUID and other.PatientID != a.PatientID
    # Standard UIDs (the SOP class) are not personal: kept.
    assert a.SOPClassUID == _read(study[0]).SOPClassUID


def test_options_keep_retain_dates_and_clean_descriptions(study: list[Path]) -> None:
    original = _read(study[0])
    rule = Deidentifier(SECRET, keep=("PatientSex", "StationName"), retain_dates=True,
                        clean_descriptions=True)
    ds = _deid(study[0], rule)
    assert ds.StationName == IDENTIFYING["StationName"] and ds.PatientSex == original.PatientSex
    # Dates shifted by the patient's offset, times of day kept, intervals kept.
    shift = rule.date_shift(IDENTIFYING["PatientID"]).days
    assert -3650 <= shift <= -1
    import datetime

    def day(text: str) -> datetime.date:
        return datetime.datetime.strptime(text, "%Y%m%d").date()

    assert day(ds.StudyDate) - day(original.StudyDate) == datetime.timedelta(days=shift)
    assert day(ds.ContentDate) - day(ds.StudyDate) == \
        day(original.ContentDate) - day(original.StudyDate)
    assert ds.StudyTime == original.StudyTime
    # The description stays, without the patient's name or ID in it.
    assert ds.StudyDescription == "TORAX * *"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == \
        ["113100", "113107", "113105"]


def test_a_destinations_rules_chain_in_order(study: list[Path], tmp_path: Path) -> None:
    from relay.edit.rules import KeywordRule

    edits = DestinationEdits([KeywordRule("StudyDescription", value="RESEARCH TORAX"),
                              Deidentifier(SECRET, clean_descriptions=True),
                              KeywordRule("PatientName", value="RESEARCH^SUBJECT")])
    out = tmp_path / "out.dcm"
    changes = edits.edit(study[0], out)
    ds = _read(out)
    # The rule after the de-identification is applied to the de-identified object.
    assert ds.PatientName == "RESEARCH^SUBJECT" and ds.StudyDescription == "RESEARCH TORAX"
    assert ds.PatientID.startswith("ANON-")
    paths = [c.path for c in changes]
    assert paths[0] == "StudyDescription" and paths[-1] == "PatientName"
    assert "StudyInstanceUID" in paths
    # A dry run lists the same changes and writes nothing.
    assert [c.path for c in edits.edit(study[0], None)] == paths
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.dcm", "study"]


def test_which_objects_may_carry_burned_in_text() -> None:
    from pydicom.dataset import Dataset

    from relay.edit.burnedin import burned_in_risk

    def obj(sop_class: str, modality: str | None, flag: str | None, pixels: bool = True
            ) -> Dataset:
        ds = Dataset()
        ds.SOPClassUID = sop_class
        if modality is not None:
            ds.Modality = modality
        if flag is not None:
            ds.BurnedInAnnotation = flag
        if pixels:
            ds.PixelData = b"\0\0"
        return ds

    ct, us, sc, pdf, sr = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.6.1",
                           "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.104.1",
                           "1.2.840.10008.5.1.4.1.1.88.11")
    assert burned_in_risk(obj(ct, "CT", "YES")) == "BurnedInAnnotation is YES"
    assert burned_in_risk(obj(ct, "CT", None)) is None
    assert burned_in_risk(obj(us, "US", "NO")) is None
    assert "absent on this Ultrasound object" in str(burned_in_risk(obj(us, "US", None)))
    assert "empty on this Secondary Capture" in str(burned_in_risk(obj(sc, "OT", "")))
    assert "on this XC object" in str(burned_in_risk(obj(ct, "XC", None)))  # by modality
    assert burned_in_risk(obj(pdf, "DOC", "YES", pixels=False)) == "BurnedInAnnotation is YES"
    assert burned_in_risk(obj(sr, "SR", None, pixels=False)) is None  # nothing to look at


def test_a_deidentifying_destination_sets_aside_burned_in_text_unless_redacted(
        tmp_path: Path) -> None:
    import numpy as np

    from dicomdata import bundled, copy_with_new_uids
    from relay.config.load import load_config
    from relay.edit.editor import BadInput

    sc = tmp_path / "sc.dcm"
    copy_with_new_uids(bundled("SC_rgb_small_odd.dcm"), sc)  # 3 x 3 RGB, no flag
    (tmp_path / "k").write_bytes(SECRET)
    base = ('[[destinations]]\nname = "d"\nae_title = "D"\nhost = "h"\nport = 104\n'
            f'[[destinations.rules]]\ndeidentify = "basic"\nsecret_file = "{tmp_path / "k"}"\n')
    (tmp_path / "plain.toml").write_text(base)
    (tmp_path / "redacts.toml").write_text(
        base + '[[destinations.rules]]\nredact = [{ Modality = "OT", Columns = 3, '
        'regions = [[0, 0, 3, 1]] }]\n')
    plain = DestinationEdits(load_config(tmp_path / "plain.toml").destinations[0].rules)
    with pytest.raises(BadInput) as refused:
        plain.edit(sc, tmp_path / "out-plain.dcm")
    assert refused.value.reason == "burned-in" and not refused.value.sensitive
    redacting = DestinationEdits(load_config(tmp_path / "redacts.toml").destinations[0].rules)
    changes = redacting.edit(sc, tmp_path / "out.dcm")
    assert [c.after for c in changes if c.path == "PixelData"] == [
        "blanked [0, 0, 3, 1] in 1 frame(s) of 3x3"]
    got, original = _read(tmp_path / "out.dcm"), _read(sc)
    assert got.BurnedInAnnotation == "NO" and got.PatientIdentityRemoved == "YES"
    assert not got.pixel_array[0].any()
    assert np.array_equal(got.pixel_array[1:], original.pixel_array[1:])
    assert "redact Modality = 'OT', Columns = 3: [0, 0, 3, 1]" in redacting.describe()

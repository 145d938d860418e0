"""Test data: the real files shipped in pydicom's wheel, and sets generated from them."""

from __future__ import annotations

import warnings
from pathlib import Path

import pydicom
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

DATA_ROOT = Path(pydicom.__file__).parent / "data"


def bundled(name: str) -> Path:
    """A file bundled with pydicom by name (test_files/ or charset_files/)."""
    for sub in ("test_files", "charset_files"):
        path = DATA_ROOT / sub / name
        if path.is_file():
            return path
    raise FileNotFoundError(name)


def readable_bundled_files() -> list[Path]:
    """Every file in pydicom's wheel that pydicom reads as a DICOM file (with file meta)."""
    out = []
    for path in sorted(DATA_ROOT.rglob("*")):
        if not path.is_file():
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, Exception):  # noqa: BLE001 - "can read" is the filter
            continue
        if ds.file_meta.get("TransferSyntaxUID") and ds.file_meta.get("MediaStorageSOPClassUID"):
            out.append(path)
    return out


# A mixed set a modality might send: CT, MR, compressed (JPEG 2000, RLE, JPEG), big endian,
# non-ASCII names (Latin-1 with accents, ISO 2022 Japanese, UTF-8 Chinese).
MIXED = [
    "CT_small.dcm",
    "MR_small.dcm",
    "JPEG2000.dcm",
    "MR_small_RLE.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "MR_small_bigendian.dcm",
    "chrFren.dcm",
    "chrH31.dcm",
    "chrX1.dcm",
]


def copy_with_new_uids(source: Path, target: Path, *, ethnic_group: str | None = None,
                       patient_id: str | None = None) -> str:
    """Write a copy of `source` with new Study/Series/SOP Instance UIDs; return the new
    SOP Instance UID. The encoding (transfer syntax) of the source is kept."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(source)
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if ethnic_group is not None:
        ds.EthnicGroup = ethnic_group
    if patient_id is not None:
        ds.PatientID = patient_id
    target.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(target, enforce_file_format=False)
    return uid


# Beyond images: a structured report and RT objects (an archive must take them too).
NON_IMAGES = ["test-SR.dcm", "rtplan.dcm", "rtdose.dcm"]


def mixed_study(folder: Path, names: list[str] | None = None) -> dict[str, dict[str, str]]:
    """The MIXED files (or `names`) with new UIDs, each with its own EthnicGroup and a
    PatientID that differs from it. Returns SOP Instance UID → {source, ethnic_group,
    patient_id}."""
    out = {}
    for i, name in enumerate(MIXED if names is None else names):
        eg = f"EG{i:04d}"
        uid = copy_with_new_uids(bundled(name), folder / f"{i:02d}_{name}", ethnic_group=eg,
                                 patient_id=f"ORIG{i}")
        out[uid] = {"source": name, "ethnic_group": eg, "patient_id": f"ORIG{i}"}
    return out


def ct_series(folder: Path, count: int, ethnic_group: str = "EG-CT", *,
              first_number: int = 1, **values: str) -> list[str]:
    """`count` copies of CT_small, each with new UIDs (one series of a new study), numbered
    from `first_number` (InstanceNumber and file name ct<number - 1>.dcm); `values`: other
    attributes by keyword (PatientID="X", …)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(bundled("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.EthnicGroup = ethnic_group
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    uids = []
    for i in range(first_number - 1, first_number - 1 + count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(folder / f"ct{i:05d}.dcm", enforce_file_format=False)
        uids.append(uid)
    return uids


def multiframe_ct(target: Path, megabytes: int, *, ethnic_group: str = "BIG") -> str:
    """A large multi-frame object: CT_small's pixels repeated to about `megabytes` MB, new
    UIDs. Returns its SOP Instance UID."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(bundled("CT_small.dcm"))
    frame = ds.PixelData
    frames = megabytes * 1024 * 1024 // len(frame)
    ds.NumberOfFrames = frames
    ds.PixelData = frame * frames
    uid = generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.EthnicGroup = ethnic_group
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=False)
    return uid


IDENTIFYING = {
    "PatientName": "Pérez^Juan^Carlos", "PatientID": "HC-0042", "PatientBirthDate": "19610704",
    "AccessionNumber": "ACC777", "InstitutionName": "Clínica San Martín",
    "ReferringPhysicianName": "Gómez^Ana", "StationName": "CT-SANMARTIN",
    "StudyDescription": "TORAX Pérez HC-0042", "OperatorsName": "Ruiz^Luis",
    "StudyID": "S123", "OtherPatientIDs": "DNI-12345678",
}


def identified_study(folder: Path, series: list[int]) -> dict[str, list[str]]:
    """One study of CT_small copies, `series[i]` objects in series i, carrying identifying
    values (IDENTIFYING, EthnicGroup 'EG-STUDY', and a private element). Returns series folder
    name → its SOP Instance UIDs; the objects of series i are in folder/series{i}/."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(bundled("CT_small.dcm"))
    for keyword, value in IDENTIFYING.items():
        setattr(ds, keyword, value)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.EthnicGroup = "EG-STUDY"
    ds.StudyInstanceUID = generate_uid()
    out: dict[str, list[str]] = {}
    number = 0
    for i, count in enumerate(series):
        ds.SeriesInstanceUID = generate_uid()
        ds.SeriesNumber = i + 1
        name = f"series{i}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        out[name] = []
        for _ in range(count):
            number += 1
            uid = generate_uid()
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            ds.InstanceNumber = number
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.save_as(folder / name / f"{number:03d}.dcm", enforce_file_format=False)
            out[name].append(uid)
    return out

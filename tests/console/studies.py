"""Studies with the values a console search looks for (tests of the console and the API)."""

from __future__ import annotations

import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from dicomdata import bundled


def study(folder: Path, count: int, *, patient_id: str, ethnic_group: str, name: str,
          accession: str, first_number: int = 1) -> tuple[str, list[Path]]:
    """`count` CT objects of one new study (InstanceNumber from `first_number`): its
    StudyInstanceUID and the files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(bundled("CT_small.dcm"))
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.EthnicGroup = ethnic_group
    ds.PatientName = name
    ds.AccessionNumber = accession
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = first_number + i
        path = folder / f"{first_number + i:04d}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path, enforce_file_format=False)
        files.append(path)
    return str(ds.StudyInstanceUID), files

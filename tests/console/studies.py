"""Studies with the values a console search looks for (tests of the console and the API)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from dicomdata import ct_series


def study(folder: Path, count: int, *, patient_id: str, ethnic_group: str, name: str,
          accession: str, first_number: int = 1) -> tuple[str, list[Path]]:
    """`count` CT objects of one new study (InstanceNumber from `first_number`): its
    StudyInstanceUID and the files."""
    ct_series(folder, count, ethnic_group, first_number=first_number, PatientID=patient_id,
              PatientName=name, AccessionNumber=accession)
    files = [folder / f"ct{i:05d}.dcm" for i in range(first_number - 1,
                                                     first_number - 1 + count)]
    return str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files

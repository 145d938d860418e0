"""De-identification as a per-destination rule: the PS3.15 Annex E Basic Application Level
Confidentiality Profile, from dicom-anonymizer's tables of the standard (the 2026c edition),
with replacement values that are the same for every object, destination and restart.

Why dicom-anonymizer (KitwareMedical, BSD): it is the standard's own attribute table (D, Z,
X, U, … per attribute, regenerated from each DICOM edition) with an action per code, on
pydicom, and it lets each action be replaced. What we replace is what must be consistent and
what the profile's options change; the table, and the choice of what is removed, emptied or
kept, stays the library's:
- UIDs (U, and any UI attribute the table replaces): `2.25.<128 bits of HMAC-SHA256(secret,
  uid)>`, so the objects of one study keep one StudyInstanceUID, each series one
  SeriesInstanceUID, and the same study tomorrow maps to the same values (dicom-anonymizer's
  own mapping is random and kept in memory only);
- PatientID: a pseudonym from HMAC(secret, PatientID) (same patient, same pseudonym);
- with retain_dates (the Retain Longitudinal Temporal Information with Modified Dates
  option): dates shifted back by 1-3650 days, the same for every object of a patient;
- with clean_descriptions (the Clean Descriptors option): descriptions kept, with the
  patient's name, IDs, birth date and accession number taken out of them;
- keep: attributes named here are left as they are.
Private attributes are removed (the profile's default). Pixel data is never touched: text
burned into the image is not removed (README).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import hmac
import importlib.metadata
import io
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

PROFILES = ("basic",)
TABLES = "dicomfields_2026c"  # dicom-anonymizer's copy of PS3.15 Table E.1-1, 2026c edition
MIN_SECRET = 16  # bytes
STANDARD_UID_ROOT = "1.2.840.10008."

# The descriptions the Clean Descriptors Option keeps (cleaned) instead of removing.
DESCRIPTORS = ("StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments",
               "PerformedProcedureStepDescription", "RequestedProcedureDescription",
               "ScheduledProcedureStepDescription", "AcquisitionComments",
               "DerivationDescription", "AdmittingDiagnosesDescription",
               "AdditionalPatientHistory", "PatientComments", "StudyComments",
               "SeriesDescriptionCodeSequence")

# PS3.16 CID 7050 codes of what was done, written into DeidentificationMethodCodeSequence.
_BASIC = ("113100", "Basic Application Confidentiality Profile")
_DATES = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
_CLEAN = ("113105", "Clean Descriptors Option")


class DeidentifyError(ValueError):
    """A de-identification setting that cannot work; the message says what was expected."""


def read_secret(path: Path) -> bytes:
    try:
        secret = path.read_bytes()
    except OSError as exc:
        raise DeidentifyError(f"a readable secret file, got {path} ({exc.strerror}); make one "
                              f"with: head -c 32 /dev/urandom > {path} && chmod 600 {path}"
                              ) from None
    if len(secret.strip()) < MIN_SECRET:
        raise DeidentifyError(f"a secret file of at least {MIN_SECRET} bytes, got "
                              f"{len(secret.strip())} in {path}")
    return secret


@dataclass(frozen=True)
class Deidentifier:
    """One `deidentify = "basic"` rule with its options."""

    secret: bytes = field(repr=False)
    keep: tuple[str, ...] = ()
    retain_dates: bool = False
    clean_descriptions: bool = False
    profile: str = "basic"

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise DeidentifyError(f"one of {', '.join(PROFILES)} (PS3.15 Annex E Basic "
                                  f"Application Level Confidentiality Profile), got "
                                  f"{self.profile!r}")
        for keyword in self.keep:
            if tag_for_keyword(keyword) is None:
                raise DeidentifyError(f"DICOM keywords in keep, got {keyword!r}")

    def describe(self) -> str:
        options = [o for o, on in (("retain_dates", self.retain_dates),
                                   ("clean_descriptions", self.clean_descriptions)) if on]
        if self.keep:
            options.append("keep " + ",".join(self.keep))
        return f"deidentify {self.profile}" + (f" ({'; '.join(options)})" if options else "")

    # --- the keyed values --------------------------------------------------------------

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.secret, f"{kind}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """The replacement of a UID: the same for every object, destination and restart."""
        return "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        digest = base64.b32encode(self._digest("patient", patient_id)[:10]).decode()
        return f"ANON-{digest}"

    def date_shift(self, patient_id: str) -> datetime.timedelta:
        days = int.from_bytes(self._digest("dates", patient_id)[:4], "big") % 3650 + 1
        return datetime.timedelta(days=-days)

    # --- applying it ---------------------------------------------------------------------

    def apply(self, ds: Dataset) -> None:
        """De-identify `ds` in place (its file meta included)."""
        from dicomanonymizer.simpledicomanonymizer import anonymize_dataset, initialize_actions

        patient_id = str(ds.get("PatientID", "") or "")
        secrets = _identifying_text(ds)
        shift = self.date_shift(patient_id)
        rules: dict[tuple[int, ...], Callable[[Dataset, Any], None]] = {}
        base = initialize_actions(TABLES)
        for tag in base:
            if len(tag) != 2:
                continue  # repeating groups (curves, overlays): the library's own action
            vr = _vr(tag)
            if vr == "UI":
                rules[tag] = self._replace_uid
            elif self.retain_dates and vr in ("DA", "DT"):
                rules[tag] = _shifted(shift)
            elif self.retain_dates and vr == "TM":
                rules[tag] = _keep  # the dates move, the times of day stay
        rules[(0x0010, 0x0020)] = lambda d, t: _set(d, t, self.pseudonym(patient_id))
        if self.clean_descriptions:
            for keyword in DESCRIPTORS:
                tag = tag_for_keyword(keyword)
                if tag is not None:
                    rules[(tag >> 16, tag & 0xFFFF)] = _cleaned(secrets)
        for keyword in self.keep:
            tag = tag_for_keyword(keyword)
            assert tag is not None
            rules[(tag >> 16, tag & 0xFFFF)] = _keep
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            anonymize_dataset(ds, rules, delete_private_tags=True,
                              base_rules_gen=lambda: base)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        version = importlib.metadata.version("dicom-anonymizer")
        ds.DeidentificationMethod = (f"dicom-relay {self.describe()}; dicom-anonymizer "
                                     f"{version} ({TABLES})")[:64]
        codes = [_BASIC] + ([_DATES] if self.retain_dates else []) + (
            [_CLEAN] if self.clean_descriptions else [])
        ds.DeidentificationMethodCodeSequence = Sequence([_code(*c) for c in codes])

    def _replace_uid(self, ds: Dataset, tag: Any) -> None:
        element = ds.get(tag)
        if element is None or not element.value:
            return
        if element.VR == "SQ":  # a sequence the table names (X/Z/U*): its instance UIDs
            _walk_uids(element.value, self._map_uid)
            return
        if element.VR != "UI":
            return
        new = [self._map_uid(str(v)) for v in _as_list(element.value)]
        element.value = new if len(new) > 1 else new[0]

    def _map_uid(self, value: str) -> str:
        # UIDs of the standard (SOP classes, transfer syntaxes, coding schemes) identify no one.
        return value if value.startswith(STANDARD_UID_ROOT) else self.uid(value)


def _vr(tag: tuple[int, ...]) -> str:
    try:
        return str(dictionary_VR((tag[0] << 16) | tag[1]))
    except KeyError:
        return ""


def _as_list(value: Any) -> list[Any]:
    """An attribute's values: several (a MultiValue) or one."""
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _set(ds: Dataset, tag: Any, value: str) -> None:
    if ds.get(tag) is not None:
        ds[tag].value = value


def _keep(ds: Dataset, tag: Any) -> None:
    del ds, tag


def _shifted(shift: datetime.timedelta) -> Callable[[Dataset, Any], None]:
    def shift_date(ds: Dataset, tag: Any) -> None:
        element = ds.get(tag)
        if element is None or not element.value:
            return
        element.value = _shift_text(str(element.value), element.VR, shift)
    return shift_date


def _shift_text(text: str, vr: str, shift: datetime.timedelta) -> str:
    """YYYYMMDD (DA) or YYYYMMDD… (DT) moved by `shift`; anything else is emptied."""
    match = re.fullmatch(r"(\d{8})(.*)", text.strip())
    if match is None:
        return ""
    try:
        day = datetime.datetime.strptime(match.group(1), "%Y%m%d").date() + shift
    except ValueError:
        return ""
    return day.strftime("%Y%m%d") + (match.group(2) if vr == "DT" else "")


def _identifying_text(ds: Dataset) -> list[str]:
    """The patient's identifying strings, to be taken out of kept descriptions."""
    found: list[str] = []
    name = ds.get("PatientName")
    if name:
        found += [p for p in re.split(r"[\^= ]+", str(name)) if len(p) >= 2]
    for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate",
                    "IssuerOfPatientID"):
        value = ds.get(keyword)
        if value:
            found += [str(v) for v in _as_list(value) if len(str(v)) >= 2]
    return sorted(set(found), key=len, reverse=True)


def _cleaned(secrets: Iterable[str]) -> Callable[[Dataset, Any], None]:
    pattern = re.compile("|".join(re.escape(s) for s in secrets), re.IGNORECASE) \
        if secrets else None

    def clean(ds: Dataset, tag: Any) -> None:
        element = ds.get(tag)
        if element is None or pattern is None or element.VR == "SQ" or not element.value:
            return
        element.value = pattern.sub("*", str(element.value))
    return clean


def _walk_uids(items: Iterable[Dataset], mapping: Callable[[str], str]) -> None:
    for item in items:
        for element in item:
            if element.VR == "UI" and element.value and not isinstance(element.value, list):
                element.value = mapping(str(element.value))
            elif element.VR == "SQ":
                _walk_uids(element.value, mapping)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def profile_attributes() -> dict[str, str]:
    """Keyword → the profile's action code, for every single attribute of the table (the
    tests check what arrived against it)."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    tables = dicom_anonymization_database_selector(TABLES)
    out: dict[str, str] = {}
    for category, tags in tables.items():
        if category == "ALL_TAGS":
            continue
        for tag in tags:
            if len(tag) == 2:
                keyword = keyword_for_tag((tag[0] << 16) | tag[1])
                if keyword:
                    out[keyword] = category.removesuffix("_TAGS")
    return out

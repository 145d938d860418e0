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
- dates: what the profile replaces or empties is shifted back by 1-3650 days, the same for
  every object of a patient (a valid date, and the intervals inside a study stay true), and
  the times of day with them; the library's dummy, 00010101, is invalid for DA and DT and
  puts every study on one day. The birth date is emptied (a shifted one would keep the exact
  age), what the profile removes is removed. With retain_dates (the Retain Longitudinal
  Temporal Information with Modified Dates option), every date of the table is kept shifted,
  the birth date and those the profile removes included;
- sequences the profile replaces (an SR's ContentSequence) keep their structure: their text
  and names become ANONYMIZED, their dates are shifted, their UIDs mapped, their codes,
  enumerated values and numbers kept (the library's dummy in every sub-attribute, ValueType
  included, makes an SR no viewer reads); sequences whose UIDs the profile replaces (X/Z/U*,
  such as SourceImageSequence) keep their items with the UIDs mapped; sequences it empties
  lose their items, not the Type 1 attributes inside them;
- with clean_descriptions (the Clean Descriptors option): descriptions kept, with the
  patient's name, IDs, birth date and accession number taken out of them;
- keep: attributes named here are left as they are.
The table's attributes are also treated inside the sequences it does not name. Private
attributes are removed (the profile's default). Pixel data is not touched here: text burned
into the image is the router's gate and redact rules' matter (relay.edit.burnedin).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import functools
import hashlib
import hmac
import importlib.metadata
import io
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
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
        base = initialize_actions(TABLES)  # the library's, where ours is None
        for listed, category in _categories().items():
            if len(listed) != 2:
                continue  # repeating groups (curves, overlays): the library's own action
            action = self._action(listed, category, shift)
            if action is not None:
                rules[listed] = action
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
        in_table = _categories()

        def anonymize(item: Dataset, top: bool = False) -> None:
            # An item with nothing of the table's and nothing private is left as it is: the
            # library would try each of the table's ~600 rules on each of an RT structure
            # set's thousands of contours.
            if top or any((e.tag.group, e.tag.element) in in_table or e.tag.is_private
                          for e in item):
                anonymize_dataset(item, rules, delete_private_tags=True,
                                  base_rules_gen=lambda: dict(base))
            # The table's attributes inside the sequences it does not name are treated as at
            # the top (an RT plan's BeamSequence holds an InstitutionName).
            for element in item:
                if element.VR == "SQ" and (element.tag.group, element.tag.element) not in \
                        in_table and not (element.keyword or "").endswith("CodeSequence"):
                    for nested in element.value:
                        anonymize(nested)

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            anonymize(ds, top=True)
        _drop_overlays_without_data(ds)
        meta = getattr(ds, "file_meta", None)
        if meta is not None and "SOPInstanceUID" in ds:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientIdentityRemoved = "YES"
        version = importlib.metadata.version("dicom-anonymizer")
        ds.DeidentificationMethod = (f"dicom-relay {self.describe()}; dicom-anonymizer "
                                     f"{version} ({TABLES})")[:64]
        codes = [_BASIC, _DATES] + ([_CLEAN] if self.clean_descriptions else [])
        ds.DeidentificationMethodCodeSequence = Sequence([_code(*c) for c in codes])

    def _action(self, tag: tuple[int, ...], category: str, shift: datetime.timedelta
                ) -> Callable[[Dataset, Any], None] | None:
        """Ours for this attribute of the table, or None: the library's."""
        vr = _vr(tag)
        valued = category in VALUED
        if vr == "UI":
            return self._replace_uid
        if vr in ("DA", "DT", "TM"):
            if self.retain_dates:
                return _keep if vr == "TM" else _shifted(shift)
            if category == "X":
                return _delete
            if tag in BIRTH or (vr == "TM" and not valued):
                return _emptied
            return _keep if vr == "TM" else _shifted(shift)
        if vr == "SQ":
            if valued or category == "X_Z_U_STAR":
                return lambda ds, t: self._clean_sequence(ds, t, shift)
            if category in ("Z", "X_Z"):
                return _emptied
        return None

    def _clean_sequence(self, ds: Dataset, tag: Any, shift: datetime.timedelta) -> None:
        element = ds.get(tag)
        if element is not None and element.VR == "SQ":
            _clean_items(element.value, self._map_uid, shift)

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


# The profile's categories that leave a value (D, Z/D, X/D, X/Z/D): dates there are shifted,
# sequences cleaned in place.
VALUED = frozenset({"D", "Z_D", "X_D", "X_Z_D"})
BIRTH = frozenset({(0x0010, 0x0030), (0x0010, 0x0032)})  # PatientBirthDate, PatientBirthTime
DUMMY_TEXT = "ANONYMIZED"
_TEXT_VRS = frozenset({"PN", "LO", "SH", "LT", "ST", "UT", "UC", "AE"})


@functools.cache
def _categories() -> Mapping[tuple[int, ...], str]:
    """The profile's table: tag -> its action code (D_TAGS -> "D", X_Z_U_STAR_TAGS ->
    "X_Z_U_STAR", ...), the last one winning as in the library's own initialize_actions.
    Read once: the table is the edition's, the same for every object."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    out: dict[tuple[int, ...], str] = {}
    for category, tags in dicom_anonymization_database_selector(TABLES).items():
        if category != "ALL_TAGS":
            out.update({tuple(tag): category.removesuffix("_TAGS") for tag in tags})
    return out


def _clean_items(items: Iterable[Dataset], mapping: Callable[[str], str],
                 shift: datetime.timedelta) -> None:
    """A sequence the profile replaces, cleaned without breaking it: text and names become
    ANONYMIZED, dates shift, UIDs map; codes, enumerated values (CS) and numbers stay."""
    for item in items:
        for element in list(item):
            if element.tag.is_private:
                del item[element.tag]
            elif element.VR == "SQ":
                if not (element.keyword or "").endswith("CodeSequence"):
                    _clean_items(element.value, mapping, shift)
            elif element.VR == "UI" and element.value:
                values = [mapping(str(v)) for v in _as_list(element.value)]
                element.value = values if len(values) > 1 else values[0]
            elif element.VR in ("DA", "DT") and element.value:
                element.value = _shift_text(str(element.value), element.VR, shift)
            elif element.VR in _TEXT_VRS and element.value and \
                    not _in_code_item(item):
                element.value = DUMMY_TEXT


def _in_code_item(item: Dataset) -> bool:
    """A code's item (CodeValue, CodingSchemeDesignator, CodeMeaning): coded, not free text."""
    return "CodeValue" in item or "LongCodeValue" in item or "URNCodeValue" in item


def _drop_overlays_without_data(ds: Dataset) -> None:
    """The profile removes Overlay Data (60xx,3000), which may hold burned-in style text; the
    rest of that overlay group would be an Overlay Plane without its Type 1 data: gone too."""
    groups = {e.tag.group for e in ds if 0x6000 <= e.tag.group <= 0x601E and
              not e.tag.group % 2}
    for group in groups:
        if (group << 16 | 0x3000) not in ds:
            for tag in [e.tag for e in ds if e.tag.group == group]:
                del ds[tag]


def _delete(ds: Dataset, tag: Any) -> None:
    if tag in ds:
        del ds[tag]


def _emptied(ds: Dataset, tag: Any) -> None:
    """Z: zero length (a sequence without items), valid for every VR."""
    element = ds.get(tag)
    if element is not None:
        element.value = [] if element.VR == "SQ" else None


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

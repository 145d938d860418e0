"""The editor: read one DICOM file, run the rules on its header XML, write back what changed.

Reading is where bad input is caught: not DICOM, no file meta, truncated. Each raises
BadInput with a short reason that names the quarantine folder (failed/<reason>/).
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from lxml import etree
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_partial, read_preamble
from pydicom.tag import Tag

from relay.config.model import EditRule
from relay.edit.dicomxml import (
    AttributeChange,
    ConversionError,
    apply_xml_changes,
    charset_of,
    dataset_to_xml,
    peek,
)
from relay.edit.rules import MissingSource, RuleError
from relay.edit.scan import Unsure, data_set_start, file_chunks, find_cut, inflate_excess
from relay.edit.splice import splice_file
from relay.events import IDENTITY_KEYWORDS, Identity

log = logging.getLogger("relay.edit")

# Values larger than this stay on disk while editing (pixel data, big private blobs): pydicom
# reads them from the source file again only when writing.
DEFER_SIZE = 64 * 1024
UNDEFINED_LENGTH = 0xFFFFFFFF
DEFLATED = "1.2.840.10008.1.2.1.99"
# A data set larger than this (inflated, for a deflated one) is refused (receiver.max_object_mb).
MAX_OBJECT = 2048 * 1024 * 1024
# What identifies an object and its study (relay.events.Identity): keyword -> tag.
IDENTITY_TAGS = {keyword: int(tag_for_keyword(keyword) or 0)
                 for keyword in IDENTITY_KEYWORDS.values()}


# Reasons whose detail is the relay's own words, never a value of the object: the others may
# quote one (a rule's value that cannot be encoded, a library's error about a value).
PLAIN_REASONS = frozenset({"not-dicom", "truncated", "no-file-meta", "too-large",
                           "missing-source", "burned-in"})


class BadInput(Exception):
    """A file the relay cannot forward as it is; `reason` names its failed/ folder."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        # The detail may quote patient values ([audit].patient_values = false keeps it out
        # of sidecars and log lines).
        self.sensitive = reason not in PLAIN_REASONS


@dataclass
class EditOutcome:
    sop_instance_uid: str
    transfer_syntax: str
    source_ae: str | None = None  # (0002,0016): the calling AE title, as receivers record it
    identity: Identity = field(default_factory=Identity)  # as received, before the rules
    changes: list[AttributeChange] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # rules skipped: source absent (kept)


def read_dicom(path: Path, up_to: int | None = None,
               beyond: dict[int, str] | None = None,
               max_object: int = MAX_OBJECT) -> FileDataset:
    """Read a DICOM file's header (large values deferred); reject what cannot be relayed.

    up_to: decode only the top-level elements up to this tag (what the rules touch); the rest
    of the file is walked without decoding (relay.scan) to check it is all there, and the
    identifying values found on the way (IDENTITY_TAGS) go into `beyond`, decoded.
    max_object: a deflated data set is inflated (pydicom does it in memory) only if it stays
    under this many bytes and a sane ratio."""
    stopped: list[int] = []
    _check_deflated(path, max_object)

    def stop(tag: int, vr: str | None, length: int) -> bool:
        if up_to is not None and tag > up_to:
            stopped.append(tag)
            return True
        return False

    try:
        size = path.stat().st_size
        if size == 0:
            raise BadInput("not-dicom", "empty file (0 bytes)")
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(fp, stop_when=stop, defer_size=DEFER_SIZE)
            rest = fp.tell()
    except BadInput:
        raise
    except InvalidDicomError as exc:
        raise BadInput("not-dicom", str(exc).splitlines()[0]) from None
    except (EOFError, ValueError, IndexError, KeyError, TypeError, NotImplementedError,
            OverflowError) as exc:
        raise BadInput("unreadable", f"{type(exc).__name__}: {exc}") from None
    problem = (_truncation(path, ds, size) if not stopped
               else _cut_after(path, ds, rest, size, {} if beyond is None else beyond))
    if problem:
        raise BadInput("truncated", problem)
    meta = ds.file_meta
    for keyword in ("TransferSyntaxUID", "MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID"):
        if not meta.get(keyword):
            raise BadInput("no-file-meta", f"file meta information lacks {keyword}")
    ds.filename = str(path)  # deferred values are read from here when writing
    return ds


def _check_deflated(path: Path, max_object: int) -> None:
    """A deflated data set that would inflate past the limits is refused before pydicom
    inflates it (whole, in memory)."""
    try:
        start = data_set_start(path)
        with open(path, "rb") as fp:
            head = fp.read(start or 4096)
    except OSError:
        return  # read_dicom says what is wrong with it
    if DEFLATED.encode() not in head:
        return
    if start is None:
        with open(path, "rb") as fp:
            read_preamble(fp, False)
            _read_file_meta_info(fp)
            start = fp.tell()
    why = inflate_excess(file_chunks(path, start), max_object)
    if why:
        raise BadInput("too-large", why)


def _cut_after(path: Path, ds: FileDataset, start: int, size: int,
               beyond: dict[int, str]) -> str | None:
    """Why the part of the file pydicom did not decode is cut short, or None; the
    identifying values in that part go into `beyond`."""
    implicit, little = ds.original_encoding
    if ds.file_meta.get("TransferSyntaxUID") == DEFLATED or implicit is None or little is None:
        return None  # positions in a deflated stream say nothing about the file
    raw: dict[int, tuple[bytes | None, bytes]] = {}
    try:
        cut = find_cut(path, start, implicit, little, frozenset(IDENTITY_TAGS.values()), raw)
    except Unsure:
        # Something the walk does not model: let pydicom read it all and judge as before.
        whole = read_dicom(path)
        charset = charset_of(whole)
        beyond.update({tag: _text(whole, tag, charset) for tag in IDENTITY_TAGS.values()})
        return _truncation(path, whole, size)
    charset = charset_of(ds)
    for tag, (vr, value) in raw.items():
        element = RawDataElement(Tag(tag), vr.decode("ascii") if vr else None, len(value),
                                 value, 0, implicit, little)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                decoded = convert_raw_data_element(element, encoding=charset, ds=ds)
            beyond[tag] = _as_text(decoded.value)
        except Exception:  # noqa: BLE001, S112 - an undecodable value identifies nothing
            continue
    return cut.detail if cut else None


def _as_text(value: object) -> str:
    """A value as one string (several values joined with a backslash, as DICOM does)."""
    if value is None:
        return ""
    if isinstance(value, list | tuple):
        return "\\".join(_as_text(v) for v in value)
    return str(value).strip()


def _text(ds: Dataset, tag: int, charset: object) -> str:
    """An element's value as text, read without changing `ds` ('' when absent)."""
    try:
        element = peek(ds, tag, charset)
        return "" if element is None else _as_text(element.value)
    except Exception:  # noqa: BLE001 - an undecodable value identifies nothing
        return ""


def identity_of(ds: Dataset, beyond: dict[int, str]) -> Identity:
    """What identifies the object: from the elements read, else from those found beyond
    them."""
    charset = charset_of(ds)
    return Identity(**{name: _text(ds, IDENTITY_TAGS[keyword], charset) or
                       beyond.get(IDENTITY_TAGS[keyword], "")
                       for name, keyword in IDENTITY_KEYWORDS.items()})


# The Sequence Delimitation Item that ends an undefined-length element, in both byte orders.
_SEQ_DELIMITERS = (bytes.fromhex("feffdde000000000"), bytes.fromhex("fffee0dd00000000"))


def _truncation(path: Path, ds: FileDataset, size: int) -> str | None:
    """Why this object looks cut short, or None. pydicom stops silently at a short element,
    so we check what it cannot: the last element's declared extent against the file size,
    the closing delimiter of an undefined-length last element, and image pixels present."""
    tags = list(ds.keys())
    if not tags:
        return "no data set after the file meta information"
    if ds.file_meta.get("TransferSyntaxUID") == DEFLATED:
        # Positions are in the inflated stream: the file size says nothing about them.
        return None
    last = ds.get_item(tags[-1], keep_deferred=True)
    if isinstance(last, RawDataElement):
        if last.length != UNDEFINED_LENGTH:
            end = last.value_tell + last.length
            if end != size:
                return (f"the last element {last.tag} ends at byte {end} but the file has "
                        f"{size} bytes")
        elif not _ends_with_delimiter(path, size):
            return f"the last element {last.tag} has no closing delimiter"
    elif getattr(last, "is_undefined_length", False) and not _ends_with_delimiter(path, size):
        return f"the last element {last.tag} has no closing delimiter"
    # A cut exactly at an element boundary leaves a well-formed (shorter) object: no check on
    # the file alone can see that. Receivers therefore hand over only completed objects.
    return None


def _ends_with_delimiter(path: Path, size: int) -> bool:
    if size < 8:
        return False
    with open(path, "rb") as fp:
        fp.seek(size - 8)
        return fp.read(8) in _SEQ_DELIMITERS


def write_dataset(ds: FileDataset, dst: Path, sync: bool) -> None:
    """Write a whole data set with pydicom (its file meta and transfer syntax as they are)."""
    with os.fdopen(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fp:
        ds.save_as(fp, enforce_file_format=False)
        fp.flush()
        if sync:
            os.fsync(fp.fileno())


class ToolkitConverter(Protocol):
    """A toolkit's own DICOM ⇄ XML tools (`converter = "toolkit"`: dcm4che's dcm2xml and
    xml2dcm). The embedded converter (relay.dicomxml) is used otherwise."""

    def to_xml(self, path: Path) -> etree._Element: ...

    def from_xml(self, root: etree._Element, original: Path, out: Path) -> None: ...


def scoped(root: etree._Element, scope: frozenset[str] | None) -> etree._Element:
    """A copy of `root` with only its top-level attributes whose tags (as the XML writes them:
    "00100020") are in `scope`; all of them when scope is None."""
    if scope is None:
        return copy.deepcopy(root)
    out = etree.Element(root.tag, {str(k): str(v) for k, v in root.attrib.items()})
    for node in root.iterchildren("DicomAttribute"):
        if node.get("tag") in scope:
            out.append(copy.deepcopy(node))
    return out


def changed_only(root: etree._Element, before: etree._Element,
                 scope: frozenset[str] | None = None) -> etree._Element:
    """The edited XML with only the top-level attributes the rules changed or added (looking
    only at those in `scope`, the rules' own, when given: nothing else can have changed).

    xml2dcm merges what the XML holds over the original; given everything, it rewrites every
    attribute from its XML form, and that form is not exact: FD values keep 15 digits, a
    person name's empty trailing components and a text's trailing CR/LF go, and bulk data
    inside sequence items (left out of the XML) goes with the items it was in (an ECG's
    waveform data). Given only what changed, everything else stays as received."""
    as_read = {node.get("tag"): etree.tostring(node)
               for node in before.iterchildren("DicomAttribute")}
    pruned = etree.Element(root.tag, {str(k): str(v) for k, v in root.attrib.items()})
    for node in root.iterchildren("DicomAttribute"):
        if scope is not None and node.get("tag") not in scope:
            continue
        if as_read.get(node.get("tag")) != etree.tostring(node):
            pruned.append(copy.deepcopy(node))
    return pruned


class Editor:
    """Applies the configured rules to files; pure apart from reading and writing them."""

    def __init__(self, rules: tuple[EditRule, ...] | list[EditRule],
                 converter: ToolkitConverter | None = None,
                 max_object: int = MAX_OBJECT) -> None:
        self.rules = tuple(rules)
        self.converter = converter
        self.max_object = max_object
        # When every rule names the attributes it touches (the keyword form), the XML needs
        # only those: same result, a fraction of the work.
        reads = [rule.reads() for rule in self.rules]
        self.only: frozenset[int] | None = (
            None if any(r is None for r in reads) else frozenset().union(*reads))  # type: ignore[arg-type]
        # And the header need be decoded only up to the last of them, and (0008,0005), the
        # character set their values are decoded with (the embedded converter only).
        self.up_to = (max(*self.only, 0x00080005) if self.only and converter is None
                      else None)
        # The toolkit's XML holds the whole header: the diff after the rules looks only at
        # what they can have touched, and at the file meta's SOP UIDs, kept in step with them.
        # (Comparing every attribute twice cost more than the conversion itself.)
        self.scope: frozenset[str] | None = (
            None if self.only is None or converter is None
            else frozenset(f"{tag:08X}" for tag in self.only | {0x00020002, 0x00020003}))

    def edit(self, src: Path, dst: Path | None, sync: bool = True,
             whole: bool = False) -> EditOutcome:
        """Edit `src` into `dst` (None: dry run). `dst` gets a hard link when nothing changed.
        sync=False leaves `dst` unflushed: the caller then makes it durable (the pipeline
        syncs many edits at once) before it drops `src`. whole: decode every element (else,
        when the rules name what they touch, only the elements up to those)."""
        up_to = None if whole else self.up_to
        beyond: dict[int, str] = {}
        # Bad input is caught the same way whatever the converter.
        ds = read_dicom(src, up_to, beyond, self.max_object)
        meta = ds.file_meta
        outcome = EditOutcome(
            sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
            transfer_syntax=str(meta.TransferSyntaxUID),
            source_ae=str(meta.get("SourceApplicationEntityTitle", "") or "").strip() or None,
            identity=identity_of(ds, beyond),
        )
        root = before = None
        # The elements as read (before the rules change `ds`), for splicing the changes into
        # the original file; only the embedded converter writes that way.
        read = ({int(tag): ds.get_item(tag, keep_deferred=True)
                 for tag in ds.keys()}  # noqa: SIM118
                if self.rules and self.converter is None else {})
        if self.rules:
            root, before, outcome.changes, outcome.missing = self._apply_rules(src, ds)
        if dst is None:
            return outcome
        if not outcome.changes:
            os.link(src, dst)  # unchanged: the very same bytes, no copy
            return outcome
        if self.converter is not None:
            assert root is not None and before is not None
            self._write_with_toolkit(root, before, outcome.changes, src, dst, sync)
            return outcome
        self._sync_media_uids(ds, outcome.changes)
        top_level = {c.tag for c in outcome.changes}
        # SOP UID changes also change the file meta: pydicom rewrites those files whole.
        if (None not in top_level
                and not any(c.path in ("SOPInstanceUID", "SOPClassUID") for c in outcome.changes)
                and splice_file(src, dst, ds, read, top_level, sync)):  # type: ignore[arg-type]
            return outcome
        if up_to is not None:
            # pydicom rewrites the file whole: it needs every element decoded first.
            return self.edit(src, dst, sync, whole=True)
        try:
            write_dataset(ds, dst, sync)
        except (ValueError, TypeError, OverflowError):
            # Some files declare one encoding and use another (explicit VR in the meta,
            # implicit in the data set): pydicom then lacks the VRs of untouched elements.
            # Decoding them all gives it the VRs, and the object goes out well-formed.
            for _ in ds.iterall():
                pass
            try:
                write_dataset(ds, dst, sync)
            except (ValueError, TypeError, OverflowError) as exc:
                raise BadInput("write-failed", f"{type(exc).__name__}: {exc}") from None
        return outcome

    def _apply_rules(self, src: Path, ds: FileDataset) -> tuple[
            etree._Element, etree._Element, list[AttributeChange], list[str]]:
        """(the edited XML, the XML as read, the changes, the rules whose source was
        missing)."""
        if self.converter is None:
            root = dataset_to_xml(ds, self.only)
        else:
            try:
                root = self.converter.to_xml(src)
            except (ValueError, OSError, etree.XMLSyntaxError) as exc:
                raise BadInput("unreadable", f"toolkit converter: {exc}") from None
        before = scoped(root, self.scope)
        missing: list[str] = []
        for rule in self.rules:
            try:
                root = rule.apply(root)
            except MissingSource as exc:
                if rule.on_missing == "fail":
                    raise BadInput("missing-source", f"rule {rule.describe()}: {exc}") from None
                missing.append(f"{rule.describe()}: {exc}")
            except RuleError as exc:
                raise BadInput("rule-error", str(exc)) from None
        # With the embedded converter the changes are set on `ds` as they are found; the
        # toolkit writes the whole edited XML back itself.
        target = ds if self.converter is None else None
        after = root if self.scope is None else scoped(root, self.scope)
        try:
            changes = apply_xml_changes(target, before, after)
        except (ConversionError, ValueError, TypeError, KeyError) as exc:
            raise BadInput("rule-error", f"cannot write the edited header back: {exc}") from None
        return root, before, changes, missing

    def _write_with_toolkit(self, root: etree._Element, before: etree._Element,
                            changes: list[AttributeChange], src: Path, dst: Path,
                            sync: bool) -> None:
        assert self.converter is not None
        removed = [c.path for c in changes if c.after is None]
        if removed:
            # xml2dcm merges the XML over the original: what the XML lacks stays.
            raise BadInput("rule-error", f"converter = toolkit cannot remove attributes "
                           f"({', '.join(removed)}); use converter = embedded")
        changed = {c.path for c in changes}
        for data_kw, meta_tag, meta_kw in (("SOPInstanceUID", 0x00020003,
                                            "MediaStorageSOPInstanceUID"),
                                           ("SOPClassUID", 0x00020002, "MediaStorageSOPClassUID")):
            if data_kw in changed and meta_kw not in changed:
                # xml2dcm keeps group 0002 from the XML: it must name the edited object.
                value = root.findtext(f"DicomAttribute[@keyword='{data_kw}']/Value")
                meta = root.find(f"DicomAttribute[@tag='{meta_tag:08X}']/Value")
                if value and meta is not None:
                    meta.text = value
        try:
            self.converter.from_xml(changed_only(root, before, self.scope), src, dst)
        except (ValueError, OSError) as exc:
            raise BadInput("write-failed", f"toolkit converter: {exc}") from None
        if sync:
            with open(dst, "rb") as fp:
                os.fsync(fp.fileno())

    @staticmethod
    def _sync_media_uids(ds: Any, changes: list[AttributeChange]) -> None:
        # Group 0002 must keep naming the same object as the dataset it describes.
        changed = {c.path for c in changes}
        meta = ds.file_meta
        if "SOPInstanceUID" in changed and "MediaStorageSOPInstanceUID" not in changed:
            meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if "SOPClassUID" in changed and "MediaStorageSOPClassUID" not in changed:
            meta.MediaStorageSOPClassUID = ds.SOPClassUID

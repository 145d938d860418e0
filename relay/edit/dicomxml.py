"""DICOM ⇄ PS3.19 Native DICOM Model XML, in process (the embedded converter).

Only the header becomes text: bulk data (pixel data, large OB/OW values, deferred elements) is
written as a <BulkData> reference and never decoded. Writing back does not rebuild the object
from XML: the XML before and after the rules is compared and only the attributes that differ are
set on the dataset read from the file. Everything else (transfer syntax, character set, private
tags, pixel data) keeps its original bytes because pydicom writes untouched raw elements as read.
"""

from __future__ import annotations

import base64
import re
import warnings
from dataclasses import dataclass
from typing import Any

from lxml import etree
from pydicom.charset import convert_encodings, decode_bytes, default_encoding
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.valuerep import PersonName

# Binary VRs: never turned into text beyond a small inline size.
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"})
INT_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
FLOAT_VRS = frozenset({"FL", "FD"})
# Small binary values are inlined (base64) so a rule can read them; larger ones are references.
INLINE_LIMIT = 512
# Pixel data (float, double, plain) is bulk data whatever its size.
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
# Characters XML 1.0 cannot carry. A value holding one is inlined as its raw bytes instead.
_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


class ConversionError(ValueError):
    """The XML cannot be turned back into DICOM (e.g. a rule wrote into bulk data)."""


@dataclass(frozen=True)
class AttributeChange:
    """One attribute changed by the rules, for logs, audit and `edit --dry-run`."""

    path: str  # e.g. "PatientID" or "OtherPatientIDsSequence[1].PatientID"
    before: str | None  # None: the attribute did not exist
    after: str | None  # None: the attribute was removed
    tag: int | None = None  # the top-level tag when the change is top-level itself

    def __str__(self) -> str:
        def show(v: str | None) -> str:
            return "(absent)" if v is None else repr(v)

        return f"{self.path}: {show(self.before)} -> {show(self.after)}"


def peek(ds: Dataset, tag: int, encoding: Any = default_encoding) -> DataElement | None:
    """An element's decoded form without storing it back into `ds` (which would re-encode it:
    what is not edited must keep its bytes)."""
    raw = ds.get_item(tag)
    if isinstance(raw, RawDataElement):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return convert_raw_data_element(raw, encoding=encoding, ds=ds)
    return raw


def charset_of(ds: Dataset, inherited: Any = None) -> Any:
    """The Python codecs of a data set's Specific Character Set (inherited: those of the
    data set it is an item of; default: the default repertoire)."""
    if inherited is None:
        inherited = [default_encoding]
    elem = peek(ds, 0x00080005)
    if elem is None:
        return inherited
    value = elem.value
    if not value:
        return inherited
    # Python codec names, as pydicom's decoders expect (ISO_IR 192 → utf_8, …).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_encodings(list(value) if isinstance(value, MultiValue) else [value])


def _tag_hex(tag: int) -> str:
    return f"{tag:08X}"


def _private_creator(ds: Dataset, tag: int, creators: dict[int, str | None]) -> str | None:
    """The Private Creator of a private tag; `creators` caches them per data set."""
    group, elem = tag >> 16, tag & 0xFFFF
    if group % 2 == 0 or elem < 0x1000:
        return None
    creator_tag = (group << 16) | (elem >> 8)
    if creator_tag not in creators:
        creator = peek(ds, creator_tag)
        creators[creator_tag] = str(creator.value).strip() if creator and creator.value else None
    return creators[creator_tag]


def _values(elem: DataElement) -> list[Any]:
    value = elem.value
    if value is None or value == "" or value == b"":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _add_person_name(parent: etree._Element, number: int, pn: PersonName) -> None:
    node = etree.SubElement(parent, "PersonName", number=str(number))
    for group_name, group in zip(PN_GROUPS, pn.components, strict=False):
        if not group:
            continue
        g = etree.SubElement(node, group_name)
        for comp_name, comp in zip(PN_COMPONENTS, group.split("^"), strict=False):
            if comp:
                etree.SubElement(g, comp_name).text = comp


def _value_text(vr: str, value: Any) -> str:
    if vr == "AT":
        return _tag_hex(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _inline(node: etree._Element, data: bytes) -> None:
    etree.SubElement(node, "InlineBinary").text = base64.b64encode(data).decode("ascii")


def _add_attribute(parent: etree._Element, ds: Dataset, tag: int, charset: Any,
                   path: str, creators: dict[int, str | None]) -> None:
    raw = ds.get_item(tag, keep_deferred=True)
    vr = raw.VR if raw is not None and raw.VR else (
        dictionary_VR(tag) if in_dictionary(tag) else "UN")
    node = etree.SubElement(parent, "DicomAttribute", tag=_tag_hex(tag), vr=vr)
    keyword = keyword_for_tag(tag)
    if keyword:
        node.set("keyword", keyword)
    creator = _private_creator(ds, tag, creators)
    if creator is not None and not _XML_BAD.search(creator):
        node.set("privateCreator", creator)

    # Deferred (large, not yet read) values stay on disk: a reference, never text.
    if isinstance(raw, RawDataElement) and raw.value is None and raw.length > 0:
        etree.SubElement(node, "BulkData", uri=f"bulk:{path}{_tag_hex(tag)}")
        return
    if isinstance(raw, RawDataElement):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                elem = convert_raw_data_element(raw, encoding=charset, ds=ds)
        except Exception:  # noqa: BLE001 - an undecodable value is carried as bytes
            _inline(node, bytes(raw.value or b""))
            return
    else:
        elem = raw
    vr = elem.VR
    node.set("vr", vr)

    if vr == "SQ":
        for i, item in enumerate(elem.value or [], start=1):
            item_node = etree.SubElement(node, "Item", number=str(i))
            _add_dataset(item_node, item, charset_of(item, charset), f"{path}{_tag_hex(tag)}/{i}/")
        return
    if vr in BINARY_VRS or isinstance(elem.value, bytes | bytearray):
        data = elem.value or b""
        if (isinstance(data, bytes | bytearray) and len(data) <= INLINE_LIMIT
                and tag not in PIXEL_TAGS and not elem.is_undefined_length):
            if data:
                _inline(node, bytes(data))
        else:
            etree.SubElement(node, "BulkData", uri=f"bulk:{path}{_tag_hex(tag)}")
        return
    values = _values(elem)
    texts = [] if vr == "PN" else [_value_text(vr, v) for v in values]
    if any(_XML_BAD.search(t) for t in texts) or (
        vr == "PN" and any(_XML_BAD.search(str(v)) for v in values)
    ):
        # XML cannot hold this value: carry it unchanged as raw bytes.
        raw_bytes = raw.value if isinstance(raw, RawDataElement) else str(elem.value).encode()
        _inline(node, bytes(raw_bytes or b""))
        return
    for i, value in enumerate(values, start=1):
        if vr == "PN":
            _add_person_name(node, i, value if isinstance(value, PersonName) else PersonName(value))
        else:
            etree.SubElement(node, "Value", number=str(i)).text = texts[i - 1]


def in_dictionary(tag: int) -> bool:
    """Whether pydicom's data dictionary knows the tag (and so its VR)."""
    try:
        dictionary_VR(tag)
    except KeyError:
        return False
    return True


def _add_dataset(parent: etree._Element, ds: Dataset, charset: Any, path: str = "",
                 only: frozenset[int] | None = None) -> None:
    creators: dict[int, str | None] = {}
    for tag in sorted(ds.keys()):
        if only is None or tag in only:
            _add_attribute(parent, ds, int(tag), charset, path, creators)


def dataset_to_xml(ds: Dataset, only: frozenset[int] | None = None) -> etree._Element:
    """The PS3.19 `NativeDicomModel` of a dataset's header, file meta (group 0002) first.

    `only`: just these top-level attributes (rules that name the attributes they touch need
    no more, and building the XML of a whole header is most of an edit's cost)."""
    root = etree.Element("NativeDicomModel")
    root.set("{http://www.w3.org/XML/1998/namespace}space", "preserve")
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _add_dataset(root, meta, [default_encoding], only=only)
    _add_dataset(root, ds, charset_of(ds, [default_encoding]), only=only)
    return root


# --- XML → DICOM ---------------------------------------------------------------------------


def _numbered(node: etree._Element, name: str) -> list[etree._Element]:
    children = list(node.iterchildren(name))
    return sorted(children, key=lambda c: int(c.get("number") or 0))


def _person_name_text(node: etree._Element) -> str:
    groups = []
    for group_name in PN_GROUPS:
        g = node.find(group_name)
        if g is None:
            groups.append("")
            continue
        comps = [(g.findtext(c) or "") for c in PN_COMPONENTS]
        groups.append("^".join(comps).rstrip("^"))
    return "=".join(groups).rstrip("=")


def _parse_value(vr: str, text: str) -> Any:
    if vr in INT_VRS:
        return int(text)
    if vr in FLOAT_VRS:
        return float(text)
    if vr == "AT":
        return int(text, 16)
    return text


def element_from_xml(node: etree._Element, charset: Any) -> DataElement:
    """Build a DataElement from one <DicomAttribute> (used only for what the rules changed)."""
    tag = int(node.get("tag", ""), 16)
    vr = node.get("vr") or (dictionary_VR(tag) if in_dictionary(tag) else "UN")
    if node.find("BulkData") is not None:
        raise ConversionError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}): a rule changed an "
                              "attribute holding bulk data, which cannot be rebuilt from XML")
    if vr == "SQ":
        items = [dataset_from_xml(item, charset) for item in _numbered(node, "Item")]
        return DataElement(tag, vr, Sequence(items))
    inline = node.find("InlineBinary")
    if inline is not None:
        data = base64.b64decode(inline.text or "")
        if vr in BINARY_VRS:
            return DataElement(tag, vr, data)
        text = decode_bytes(data, list(charset), set())
        return DataElement(tag, vr, text.rstrip(" \x00"))
    if vr == "PN":
        names = [_person_name_text(p) for p in _numbered(node, "PersonName")]
        _check_encodable(tag, names, charset)
        return DataElement(tag, vr, _one_or_many(names))
    try:
        values = [_parse_value(vr, v.text or "") for v in _numbered(node, "Value")]
    except ValueError as exc:
        raise ConversionError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr}: {exc}") from None
    _check_encodable(tag, [v for v in values if isinstance(v, str)], charset)
    return DataElement(tag, vr, _one_or_many(values))


def _check_encodable(tag: int, texts: list[str], charset: Any) -> None:
    """Refuse a value the object's character set cannot carry: pydicom would write '?' in
    its place, silently corrupting a name or an ID."""
    encodings = list(charset)
    for text in texts:
        for ch in set(text):
            if ch.isascii():
                continue
            for encoding in encodings:
                try:
                    ch.encode(encoding)
                    break
                except (UnicodeError, LookupError):
                    continue
            else:
                raise ConversionError(
                    f"({tag >> 16:04X},{tag & 0xFFFF:04X}): {text!r} has characters ({ch!r}) "
                    f"that the object's character set ({', '.join(encodings)}) cannot encode")


def _one_or_many(values: list[Any]) -> Any:
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def dataset_from_xml(container: etree._Element, charset: Any) -> Dataset:
    ds = Dataset()
    for node in container.iterchildren("DicomAttribute"):
        elem = element_from_xml(node, charset)
        ds[elem.tag] = elem
    return ds


# --- the diff: apply only what the rules changed ------------------------------------------


def _by_tag(container: etree._Element) -> dict[str, etree._Element]:
    return {n.get("tag", ""): n for n in container.iterchildren("DicomAttribute")}


def _same(a: etree._Element, b: etree._Element) -> bool:
    return etree.tostring(a) == etree.tostring(b)


def describe(node: etree._Element | None) -> str | None:
    """A short human form of an attribute's value, for dry-run and logs."""
    if node is None:
        return None
    if node.get("vr") == "SQ":
        return f"<{len(node.findall('Item'))} items>"
    if node.find("BulkData") is not None:
        return "<bulk data>"
    inline = node.find("InlineBinary")
    if inline is not None:
        return f"<{len(base64.b64decode(inline.text or ''))} bytes>"
    if node.get("vr") == "PN":
        return "\\".join(_person_name_text(p) for p in _numbered(node, "PersonName"))
    return "\\".join(v.text or "" for v in _numbered(node, "Value"))


def _name(node: etree._Element) -> str:
    return node.get("keyword") or f"({node.get('tag', '')[:4]},{node.get('tag', '')[4:]})"


def _containers(ds: Dataset, tag_hex: str) -> Dataset:
    if tag_hex.startswith("0002"):
        meta = getattr(ds, "file_meta", None)
        if meta is None:
            meta = ds.file_meta = FileMetaDataset()
        return meta
    return ds


def apply_xml_changes(ds: Dataset | None, before: etree._Element, after: etree._Element,
                      charset: Any = None, prefix: str = "") -> list[AttributeChange]:
    """The attributes that differ between two XML trees of a header; when `ds` is given,
    set exactly those on it (nothing else is touched, so nothing else is re-encoded)."""
    if charset is None:
        charset = charset_of(ds, [default_encoding]) if ds is not None else [default_encoding]
    old, new = _by_tag(before), _by_tag(after)
    changes: list[AttributeChange] = []
    for tag_hex in sorted(old.keys() | new.keys()):
        o, n = old.get(tag_hex), new.get(tag_hex)
        if o is not None and n is not None and _same(o, n):
            continue
        target = None if ds is None else _containers(ds, tag_hex) if not prefix else ds
        tag = int(tag_hex, 16)
        label = prefix + _name(n if n is not None else o)  # type: ignore[arg-type]
        top = tag if not prefix else None
        if n is None:
            if target is not None:
                del target[tag]
            changes.append(AttributeChange(label, describe(o), None, top))
            continue
        if (o is not None and o.get("vr") == "SQ" and n.get("vr") == "SQ"
                and len(o.findall("Item")) == len(n.findall("Item"))):
            seq = target[tag].value if target is not None else None
            for i, (oi, ni) in enumerate(
                    zip(_numbered(o, "Item"), _numbered(n, "Item"), strict=True)):
                item = seq[i] if seq is not None else None
                item_charset = charset_of(item, charset) if item is not None else charset
                changes += apply_xml_changes(item, oi, ni, item_charset, f"{label}[{i + 1}].")
            continue
        element = element_from_xml(n, charset)  # also validates what the rules wrote
        if target is not None:
            target[tag] = element
        changes.append(AttributeChange(label, describe(o), describe(n), top))
    return changes


def safe_parser() -> etree.XMLParser:
    """The only way we parse XML: no entities, no DTD, no network (attacker-controlled input)."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                           dtd_validation=False, huge_tree=False, remove_blank_text=False)


def to_string(root: etree._Element) -> bytes:
    return etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)

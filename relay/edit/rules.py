"""EditRule: the three rule forms, applied with lxml to the PS3.19 XML of a header.

- keyword form: `set = "PatientID"` with `copy_from = "EthnicGroup"`, `value = "…"` or
  `delete = true`; acts on the top-level attribute only.
- XPath form: `xpath` selects nodes whose text is set from `value_from_xpath` (or `value`).
  The original relay's two lines work verbatim, and select exactly what they select (including
  PatientID nested in OtherPatientIDsSequence).
- XSLT form: a stylesheet that transforms the whole document (dcm4chee-arc style coercion).

Each is a relay.config.model.EditRule; relay.config.load builds them from the config's
tables. A rule whose source is missing raises MissingSource; the editor applies
`on_missing`.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from relay.edit.dicomxml import PN_COMPONENTS, PN_GROUPS, in_dictionary, safe_parser


class RuleError(ValueError):
    """A rule is badly written (reported at config load) or cannot run (a file fails)."""


class MissingSource(LookupError):
    """The attribute or XPath a rule reads from is absent or empty in this object."""


def _tag_of(name: str) -> int:
    """A keyword (`PatientID`) or 8 hex digits (`00100020`) → tag."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", name):
        return int(name, 16)
    tag = tag_for_keyword(name)
    if tag is None:
        raise RuleError(f"{name!r} is not a DICOM keyword (e.g. PatientID) nor a tag (00100020)")
    return int(tag)


def _top_level(root: etree._Element, tag: int) -> etree._Element | None:
    for node in root.iterchildren("DicomAttribute"):
        if node.get("tag") == f"{tag:08X}":
            return node
    return None


def _texts(node: etree._Element) -> list[str]:
    """The values of an attribute as strings (PN as its DICOM string form)."""
    out = []
    for child in node:
        if child.tag == "Value":
            out.append(child.text or "")
        elif child.tag == "PersonName":
            groups = []
            for g in PN_GROUPS:
                gn = child.find(g)
                groups.append("" if gn is None else
                              "^".join(gn.findtext(c) or "" for c in PN_COMPONENTS).rstrip("^"))
            out.append("=".join(groups).rstrip("="))
    return out


# Control characters a value may not carry (ESC starts ISO 2022 escape sequences: allowed).
_CONTROL_RE = re.compile(r"[\x00-\x1a\x1c-\x1f\x7f]")


def unusable(node: etree._Element) -> str | None:
    """Why a source attribute's value cannot be copied, although it is there: read as bulk
    data (over 64 KB), carried as bytes (characters XML cannot hold), or holding control
    characters (tab, newline: a LO, SH or PN value may not)."""
    if node.find("BulkData") is not None:
        return "its value is too long to be read into the rule (over 64 KB)"
    if node.find("InlineBinary") is not None:
        return "its value holds control characters or bytes that are not text"
    if any(_CONTROL_RE.search(text) for text in _texts(node)):
        return "its value holds control characters"
    return None


def _set_values(node: etree._Element, vr: str, values: list[str]) -> None:
    for child in list(node):
        node.remove(child)
    for i, text in enumerate(values, start=1):
        if vr == "PN":
            pn = etree.SubElement(node, "PersonName", number=str(i))
            for group_name, group in zip(PN_GROUPS, text.split("="), strict=False):
                if group:
                    g = etree.SubElement(pn, group_name)
                    for comp_name, comp in zip(PN_COMPONENTS, group.split("^"), strict=False):
                        if comp:
                            etree.SubElement(g, comp_name).text = comp
        else:
            etree.SubElement(node, "Value", number=str(i)).text = text


def _insert_sorted(root: etree._Element, node: etree._Element) -> None:
    tag = node.get("tag", "")
    for other in root.iterchildren("DicomAttribute"):
        if other.get("tag", "") > tag:
            other.addprevious(node)
            return
    root.append(node)


@dataclass(frozen=True)
class KeywordRule:
    """`set` a top-level attribute from another (`copy_from`), a constant, or delete it."""

    target: str
    copy_from: str | None = None
    value: str | None = None
    delete: bool = False
    on_missing: str = "keep"

    def __post_init__(self) -> None:
        _tag_of(self.target)
        if self.copy_from is not None:
            _tag_of(self.copy_from)
        if sum([self.copy_from is not None, self.value is not None, self.delete]) != 1:
            raise RuleError("expected exactly one of copy_from, value or delete = true")

    def reads(self) -> frozenset[int]:
        tags = {_tag_of(self.target)}
        if self.copy_from is not None:
            tags.add(_tag_of(self.copy_from))
        return frozenset(tags)

    def describe(self) -> str:
        if self.delete:
            return f"delete {self.target}"
        if self.copy_from is not None:
            return f"{self.target} := {self.copy_from}"
        return f"{self.target} := {self.value!r}"

    def apply(self, root: etree._Element) -> etree._Element:
        tag = _tag_of(self.target)
        node = _top_level(root, tag)
        if self.delete:
            if node is not None:
                root.remove(node)
            return root
        if self.copy_from is not None:
            source = _top_level(root, _tag_of(self.copy_from))
            why = unusable(source) if source is not None else None
            if why is not None:
                raise MissingSource(f"{self.copy_from} cannot be used: {why}")
            values = _texts(source) if source is not None else []
            if not any(values):
                raise MissingSource(f"{self.copy_from} is absent or empty")
        else:
            values = str(self.value).split("\\")
        if node is None:
            vr = dictionary_VR(tag) if in_dictionary(tag) else "LO"
            node = etree.Element("DicomAttribute", tag=f"{tag:08X}", vr=vr)
            keyword = keyword_for_tag(tag)
            if keyword:
                node.set("keyword", keyword)
            _insert_sorted(root, node)
        _set_values(node, node.get("vr", "LO"), values)
        return root


def _xpath_strings(result: object) -> list[str]:
    if isinstance(result, list):
        out = []
        for item in result:
            if isinstance(item, etree._Element):
                out.append("".join(str(text) for text in item.itertext()))
            else:
                out.append(str(item))
        return out
    if isinstance(result, bool):
        return ["true" if result else "false"]
    if isinstance(result, float) and result.is_integer():
        return [str(int(result))]
    return [str(result)]


def _compile(expr: str, key: str) -> etree.XPath:
    try:
        return etree.XPath(expr)
    except etree.XPathSyntaxError as exc:
        raise RuleError(f"{key}: expected an XPath expression, got {expr!r} ({exc})") from None


@dataclass(frozen=True)
class XPathRule:
    """Set the text of every node `xpath` selects to `value_from_xpath`'s result (or `value`)."""

    xpath: str
    value_from_xpath: str | None = None
    value: str | None = None
    on_missing: str = "keep"
    _target: etree.XPath = field(init=False, repr=False, compare=False)
    _source: etree.XPath | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Compiled once here, not per file (frozen dataclass: set through object).
        object.__setattr__(self, "_target", _compile(self.xpath, "xpath"))
        source = (None if self.value_from_xpath is None
                  else _compile(self.value_from_xpath, "value_from_xpath"))
        object.__setattr__(self, "_source", source)
        if (self.value_from_xpath is None) == (self.value is None):
            raise RuleError("expected exactly one of value_from_xpath or value")

    def reads(self) -> None:
        return None  # an XPath may look anywhere

    def describe(self) -> str:
        src = self.value_from_xpath if self.value is None else repr(self.value)
        return f"{self.xpath} := {src}"

    def apply(self, root: etree._Element) -> etree._Element:
        if self._source is not None:
            texts = _xpath_strings(self._source(root))
            if any(_CONTROL_RE.search(text) for text in texts):
                raise MissingSource(f"{self.value_from_xpath}: the value it selects holds "
                                    "control characters")
            if not any(texts):
                raise MissingSource(f"{self.value_from_xpath} selects nothing"
                                    + self._why_nothing(root))
            # Several nodes (a multi-valued source): keep them as DICOM multi-values.
            new_text = "\\".join(texts)
        else:
            new_text = str(self.value)
        targets = self._target(root)
        if not isinstance(targets, list):
            raise RuleError(f"xpath {self.xpath!r} must select nodes, "
                            f"not a {type(targets).__name__}")
        for node in targets:
            if isinstance(node, etree._Element):
                for child in list(node):
                    node.remove(child)
                node.text = new_text
            else:
                raise RuleError(f"xpath {self.xpath!r} must select elements (e.g. .../Value)")
        return root

    def _why_nothing(self, root: etree._Element) -> str:
        """When the source selects nothing, whether the attribute it names is there but
        unusable (`//DicomAttribute[...]/Value/text()` finds no Value in bulk data)."""
        assert self.value_from_xpath is not None
        expr = self.value_from_xpath
        for tail in ("/Value/text()", "/Value"):
            if expr.endswith(tail):
                try:
                    found = etree.XPath(expr[:-len(tail)])(root)
                except etree.XPathError:
                    return ""
                reasons = [why for node in (found if isinstance(found, list) else [])
                           if isinstance(node, etree._Element) and (why := unusable(node))]
                return f" (the attribute is there, but {reasons[0]})" if reasons else ""
        return ""


class _OwnFolder(etree.Resolver):
    """Lets a stylesheet read files of its own folder only (itself, and what it includes or
    imports from there): xsl:include of any other file is refused when it is loaded.
    (XSLTAccessControl governs document() and output at run time, not includes.)"""

    def __init__(self, folder: Path) -> None:
        self.folder = os.path.realpath(folder)

    def resolve(self, system_url: str, public_id: str,  # type: ignore[override]
                context: object) -> object:  # (lxml-stubs lack the context argument)
        path = (urllib.parse.unquote(urllib.parse.urlsplit(system_url).path)
                if system_url.startswith("file:") else system_url)
        real = os.path.realpath(path)
        if os.path.dirname(real) != self.folder or "://" in system_url.removeprefix("file://"):
            raise OSError(f"{system_url}: only files in the stylesheet's own folder "
                          f"({self.folder}) may be included or imported")
        return self.resolve_filename(real, context)  # type: ignore[attr-defined]


class XSLTRule:
    """Transform the document with a stylesheet: extensions, document() and file access off;
    xsl:include and xsl:import from its own folder only."""

    on_missing = "keep"

    def __init__(self, path: Path, params: dict[str, str] | None = None) -> None:
        self.path = path
        self.params = dict(params or {})
        parser = safe_parser()
        parser.resolvers.add(_OwnFolder(path.parent))
        try:
            doc = etree.parse(str(path), parser)
        except OSError as exc:
            raise RuleError(f"xslt: cannot read stylesheet {str(path)!r}: {exc}") from None
        except etree.XMLSyntaxError as exc:
            raise RuleError(f"xslt: {str(path)!r} is not well-formed XML: {exc}") from None
        try:
            self._transform = etree.XSLT(
                doc, access_control=etree.XSLTAccessControl.DENY_ALL)  # type: ignore[attr-defined]
        except (etree.XSLTParseError, OSError) as exc:
            raise RuleError(f"xslt: {str(path)!r} is not a valid stylesheet: {exc}") from None

    def reads(self) -> None:
        return None

    def describe(self) -> str:
        return f"xslt {self.path}"

    def apply(self, root: etree._Element) -> etree._Element:
        params = {k: etree.XSLT.strparam(v) for k, v in self.params.items()}
        try:
            result = self._transform(root, **params)  # type: ignore[arg-type]
        except etree.XSLTApplyError as exc:
            raise RuleError(f"xslt {self.path}: {exc}") from None
        new_root = result.getroot()
        if new_root is None or new_root.tag != "NativeDicomModel":
            raise RuleError(f"xslt {self.path}: the result is not a NativeDicomModel document")
        return new_root

"""The route stage: which destinations get an object (their filters, after the global rules),
and each one's copy (its own rules: the three forms and de-identification).

A destination's filter (`[destinations.filter]`) maps keys to patterns. Every key must match;
a list matches any of its items; items are glob patterns (`*`, `?`) matched case-sensitively
against the value as text; an item starting with `!` excludes. Keys are DICOM keywords of
top-level attributes, or the association's `calling_ae` / `called_ae`. No filter: every
object. Small pure functions: the pipeline reads the values once per object and asks.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

from relay.deidentify import Deidentifier
from relay.dicomxml import AttributeChange
from relay.edit import BadInput, Editor, read_dicom, write_dataset

if TYPE_CHECKING:
    from relay.config import Destination
    from relay.spool import Spool

ASSOCIATION_KEYS = ("calling_ae", "called_ae")


class FilterError(ValueError):
    """A filter key or pattern that cannot work; the message says what was expected."""


def _glob_regex(pattern: str) -> re.Pattern[str]:
    """`*` any run of characters, `?` one character, everything else literally."""
    parts = [".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True)
class KeyFilter:
    """One key of a filter: what its value must match (any include, no exclude)."""

    key: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_include", tuple(_glob_regex(p) for p in self.include))
        object.__setattr__(self, "_exclude", tuple(_glob_regex(p) for p in self.exclude))

    def matches(self, value: str) -> bool:
        included = not self.include or any(r.fullmatch(value) for r in self._include)  # type: ignore[attr-defined]
        return included and not any(r.fullmatch(value) for r in self._exclude)  # type: ignore[attr-defined]

    def explain(self, value: str) -> str:
        """Why `value` does not match (for the audit and the dry run)."""
        shown = repr(value) if value else "absent or empty"
        hit = [p for p, r in zip(self.exclude, self._exclude, strict=True)  # type: ignore[attr-defined]
               if r.fullmatch(value)]
        if hit:
            return f"{self.key} {shown} is excluded by !{hit[0]}"
        return f"{self.key} {shown} matches none of {', '.join(self.include)}"


@dataclass(frozen=True)
class DestinationFilter:
    keys: tuple[KeyFilter, ...] = ()

    @property
    def attribute_keywords(self) -> tuple[str, ...]:
        return tuple(k.key for k in self.keys if k.key not in ASSOCIATION_KEYS)

    def why_not(self, values: Mapping[str, str]) -> str | None:
        """None when the object matches; else the first key that fails, and why."""
        failed = self.failing_key(values)
        return None if failed is None else failed.explain(values.get(failed.key, ""))

    def failing_key(self, values: Mapping[str, str]) -> KeyFilter | None:
        for key in self.keys:
            if not key.matches(values.get(key.key, "")):
                return key
        return None


def key_filter(key: str, patterns: str | Sequence[str]) -> KeyFilter:
    """One filter key from its config value; FilterError says what was expected."""
    if key not in ASSOCIATION_KEYS:
        tag = tag_for_keyword(key)
        if tag is None:
            raise FilterError("a DICOM keyword of a top-level attribute (e.g. Modality, "
                              "StationName, SOPClassUID) or calling_ae / called_ae")
        if dictionary_VR(tag) == "SQ":
            raise FilterError("an attribute with a value, not a sequence")
    items: list[Any] = ([patterns] if isinstance(patterns, str)
                        else list(patterns) if isinstance(patterns, list | tuple) else [None])
    if not items or not all(isinstance(p, str) for p in items):
        raise FilterError("a glob pattern or a list of them (strings)")
    include, exclude = [], []
    for item in items:
        negated = item.startswith("!")
        pattern = item[1:] if negated else item
        if "[" in pattern or "]" in pattern:
            raise FilterError(f"glob patterns with * and ? only, got {item!r} ([ and ] are "
                              "not supported)")
        if negated and not pattern:
            raise FilterError("a pattern after '!', got '!' alone")
        (exclude if negated else include).append(pattern)
    return KeyFilter(key, tuple(include), tuple(exclude))


def value_as_text(value: Any) -> str:
    """An attribute's value as the text patterns are matched against: multiple values joined
    with a backslash, as DICOM stores them; absent or empty: ''."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(value_as_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


@dataclass(frozen=True)
class Routing:
    """Which destinations an object goes to; for the others why not (the value included),
    and which filter key refused it (no value: for an audit without patient values)."""

    to: tuple[str, ...]
    not_to: Mapping[str, str]
    refused_by: Mapping[str, str]


def route(values: Mapping[str, str], filters: Iterable[tuple[str, DestinationFilter | None]]
          ) -> Routing:
    to, not_to, keys = [], {}, {}
    for name, flt in filters:
        failed = flt.failing_key(values) if flt is not None else None
        if failed is None:
            to.append(name)
        else:
            not_to[name] = failed.explain(values.get(failed.key, ""))
            keys[name] = failed.key
    return Routing(tuple(to), not_to, keys)


class Router:
    """The route stage: which destinations get an object (their filters, on the object as
    the global rules left it) and each one's copy (its own rules, if any; destinations whose
    rules are written the same share one file)."""

    def __init__(self, destinations: Sequence[Destination], converter: Any = None,
                 called_ae: str = "") -> None:
        self.filters = [(d.name, d.filter) for d in destinations]
        self.keywords = sorted({k for d in destinations if d.filter is not None
                                for k in d.filter.attribute_keywords})
        self.called_ae = called_ae
        self.edits = {d.name: DestinationEdits(d.rules, converter)
                      for d in destinations if d.rules}
        self.rules_keys = {d.name: d.rules_key for d in destinations}

    def route(self, path: Path, calling_ae: str | None) -> Routing:
        values = routing_values(path, self.keywords, {"calling_ae": calling_ae or "",
                                                      "called_ae": self.called_ae})
        return route(values, self.filters)

    def copies(self, spool: Spool, claimed: Path, edited: Path, to: Sequence[str],
               sync: bool) -> tuple[dict[str, Path], dict[str, BadInput]]:
        """destination -> the file it gets, and the destinations whose own edit failed."""
        copies: dict[str, Path] = {}
        failed: dict[str, BadInput] = {}
        made: dict[str, Path | BadInput] = {}  # rules_key -> its edit (shared), or why not
        for name in to:
            edits = self.edits.get(name)
            if edits is None:
                copies[name] = edited
                continue
            key = self.rules_keys[name]
            if key not in made:
                variant = spool.edited_path(claimed, len(made))
                variant.unlink(missing_ok=True)
                try:
                    edits.edit(edited, variant, sync=sync)
                    made[key] = variant
                except BadInput as exc:
                    variant.unlink(missing_ok=True)
                    made[key] = exc
            result = made[key]
            if isinstance(result, BadInput):
                failed[name] = result
            else:
                copies[name] = result
        return copies, failed



def routing_values(path: Path, keywords: Sequence[str], association: Mapping[str, str]
                   ) -> dict[str, str]:
    """The values a set of filters looks at: the association's, and the named top-level
    attributes read from the object's header (pixel data is never read)."""
    values = dict(association)
    if keywords:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
        for keyword in keywords:
            values[keyword] = value_as_text(ds.get(keyword))
    return values


class DestinationEdits:
    """A destination's own rules, in their order: runs of the three XML forms (an Editor
    each) and de-identification steps, chained file to file."""

    def __init__(self, rules: Sequence[Any], converter: Any = None) -> None:
        self.steps: list[Any] = []
        run: list[Any] = []
        for rule in rules:
            if isinstance(rule, Deidentifier):
                if run:
                    self.steps.append(Editor(run, converter))
                    run = []
                self.steps.append(rule)
            else:
                run.append(rule)
        if run:
            self.steps.append(Editor(run, converter))

    def describe(self) -> list[str]:
        return [r.describe() for s in self.steps
                for r in (s.rules if isinstance(s, Editor) else [s])]

    def edit(self, src: Path, dst: Path | None, sync: bool = True) -> list[Any]:
        """Write `src` with these rules applied into `dst` (None: dry run); returns the
        changes (relay.dicomxml.AttributeChange). Raises relay.edit.BadInput."""
        if dst is None:
            # A dry run chains through files too, in a folder of its own (the steps link
            # unchanged files, so the copy of `src` sits beside them).
            with tempfile.TemporaryDirectory(prefix="dicom-relay-dry-") as tmp:
                copy = Path(tmp) / "in.dcm"
                shutil.copyfile(src, copy)
                return self._chain(copy, Path(tmp) / "out.dcm", sync=False)
        return self._chain(src, dst, sync)

    def _chain(self, src: Path, dst: Path, sync: bool) -> list[Any]:
        changes: list[Any] = []
        current = src
        temporaries: list[Path] = []
        try:
            for i, step in enumerate(self.steps):
                last = i == len(self.steps) - 1
                out = dst if last else dst.with_name(f"{dst.name}.{i}")
                if not last:
                    temporaries.append(out)
                if isinstance(step, Editor):
                    changes += step.edit(current, out, sync=sync and last).changes
                else:
                    changes += deidentify_file(step, current, out, sync=sync and last)
                current = out
        finally:
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)
        return changes


def deidentify_file(rule: Any, src: Path, dst: Path | None, sync: bool = True) -> list[Any]:
    """One de-identification step from file to file; the top-level attributes it changed."""
    ds = read_dicom(src)
    before = _top_level_text(ds)
    try:
        rule.apply(ds)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        raise BadInput("deidentify-failed", f"{type(exc).__name__}: {exc}") from None
    after = _top_level_text(ds)
    changes = [AttributeChange(keyword, before.get(keyword), after.get(keyword))
               for keyword in sorted(set(before) | set(after))
               if before.get(keyword) != after.get(keyword)]
    if dst is not None:
        try:
            write_dataset(ds, dst, sync)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BadInput("write-failed", f"{type(exc).__name__}: {exc}") from None
    return changes


def _top_level_text(ds: Any) -> dict[str, str]:
    out = {}
    for element in ds:
        if element.tag == 0x7FE00010 or element.tag.group == 0x0002:
            continue
        name = element.keyword or f"({element.tag.group:04X},{element.tag.element:04X})"
        if element.VR == "SQ":
            out[name] = f"(sequence of {len(element.value)} item(s))"
        elif isinstance(element.value, bytes):
            out[name] = f"({len(element.value)} bytes)"
        else:
            out[name] = value_as_text(element.value)[:80]
    return out

"""Filters: which destinations get an object. Small pure functions, no DICOM reading: the
router reads the values once per object and asks.

A destination's filter (`[destinations.filter]`) maps keys to patterns. Every key must match;
a list matches any of its items; items are glob patterns (`*`, `?`) matched case-sensitively
against the value as text; an item starting with `!` excludes. Keys are DICOM keywords of
top-level attributes, or the association's `calling_ae` / `called_ae`. No filter: every
object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.multival import MultiValue

from relay.config.model import Filter

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
    _include: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _exclude: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Compiled once here, not per object (frozen dataclass: set through object).
        object.__setattr__(self, "_include", tuple(_glob_regex(p) for p in self.include))
        object.__setattr__(self, "_exclude", tuple(_glob_regex(p) for p in self.exclude))

    def matches(self, value: str) -> bool:
        included = not self.include or any(r.fullmatch(value) for r in self._include)
        return included and not any(r.fullmatch(value) for r in self._exclude)

    def explain(self, value: str) -> str:
        """Why `value` does not match (for the audit and the dry run)."""
        shown = repr(value) if value else "absent or empty"
        hit = [p for p, r in zip(self.exclude, self._exclude, strict=True)
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
    include: list[str] = []
    exclude: list[str] = []
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


def only_to(routing: Routing, destinations: Iterable[str]) -> Routing:
    """A routing kept to some destinations (an object retried for the destination it failed
    at: the others already have it); the rest are "not to", saying why."""
    keep = set(destinations)
    why = "retried for " + ", ".join(sorted(keep)) + " only (the others had it)"
    not_to = dict(routing.not_to)
    refused_by = dict(routing.refused_by)
    for name in routing.to:
        if name not in keep:
            not_to[name] = why
            refused_by[name] = "retry"
    return Routing(tuple(d for d in routing.to if d in keep), not_to, refused_by)


def route(values: Mapping[str, str], filters: Iterable[tuple[str, Filter | None]]) -> Routing:
    """Where an object whose values are these goes, destination by destination."""
    to, not_to, keys = [], {}, {}
    for name, flt in filters:
        failed = flt.failing_key(values) if flt is not None else None
        if failed is None:
            to.append(name)
        else:
            not_to[name] = failed.explain(values.get(failed.key, ""))
            keys[name] = failed.key
    return Routing(tuple(to), not_to, keys)



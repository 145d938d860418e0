"""The router: which destinations get an object (their filters, on the object as the global
rules left it) and each one's copy (its own rules: the three XML forms, de-identification and
pixel redaction, chained file to file; destinations whose rules are written the same share one
file). A destination that de-identifies never gets an object that may carry burned-in text
(relay.edit.burnedin): failed/burned-in/ unless its redact rules blanked it."""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from relay.config.model import (
    Deidentification,
    Destination,
    DestinationRule,
    EditRule,
    PixelRedaction,
)
from relay.edit.burnedin import burned_in_risk
from relay.edit.dicomxml import AttributeChange
from relay.edit.editor import BadInput, Editor, ToolkitConverter, read_dicom, write_dataset
from relay.route.filters import Routing, route, value_as_text


@dataclass
class Copies:
    """What each destination an object is routed to gets."""

    # destination -> the file it gets (a dry run writes none for destinations with rules of
    # their own)
    files: dict[str, Path] = field(default_factory=dict)
    # destination -> what its own rules changed (destinations without rules: not listed)
    changes: dict[str, list[AttributeChange]] = field(default_factory=dict)
    # destination -> why its own rules failed on this object (it gets nothing)
    failed: dict[str, BadInput] = field(default_factory=dict)


# Where a destination's own edit is written: (destination, index of the distinct edit) ->
# path, or None for a dry run.
Place = Callable[[str, int], Path | None]


class Router:
    """The route stage: which destinations get an object (their filters, on the object as
    the global rules left it) and each one's copy (its own rules, if any; destinations whose
    rules are written the same share one file)."""

    def __init__(self, destinations: Sequence[Destination],
                 converter: ToolkitConverter | None = None, called_ae: str = "") -> None:
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

    def copies(self, edited: Path, to: Sequence[str], place: Place, sync: bool) -> Copies:
        """Each destination's copy of the object the global rules left in `edited`."""
        out = Copies()
        made: dict[str, tuple[Path | None, list[AttributeChange]] | BadInput] = {}
        for name in to:
            edits = self.edits.get(name)
            if edits is None:
                out.files[name] = edited
                continue
            key = self.rules_keys[name]
            if key not in made:  # destinations whose rules are written the same share it
                target = place(name, len(made))
                if target is not None:
                    target.unlink(missing_ok=True)
                try:
                    made[key] = (target, edits.edit(edited, target, sync=sync))
                except BadInput as exc:
                    if target is not None:
                        target.unlink(missing_ok=True)
                    made[key] = exc
            result = made[key]
            if isinstance(result, BadInput):
                out.failed[name] = result
                continue
            target, changes = result
            out.changes[name] = changes
            if target is not None:
                out.files[name] = target
        return out


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
    each), de-identification and redaction steps, chained file to file; with a
    de-identification step, the burned-in gate after them all."""

    def __init__(self, rules: Sequence[DestinationRule],
                 converter: ToolkitConverter | None = None) -> None:
        self.steps: list[Editor | Deidentification | PixelRedaction] = []
        run: list[EditRule] = []
        for rule in rules:
            if isinstance(rule, Deidentification | PixelRedaction):
                if run:
                    self.steps.append(Editor(run, converter))
                    run = []
                self.steps.append(rule)
            else:
                run.append(rule)
        if run:
            self.steps.append(Editor(run, converter))
        self.deidentifies = any(isinstance(s, Deidentification) for s in self.steps)

    def describe(self) -> list[str]:
        return [rule.describe() for step in self.steps
                for rule in (step.rules if isinstance(step, Editor) else [step])]

    def edit(self, src: Path, dst: Path | None, sync: bool = True) -> list[AttributeChange]:
        """Write `src` with these rules applied into `dst` (None: dry run); returns the
        changes. Raises BadInput."""
        if dst is None:
            # A dry run chains through files too, in a folder of its own (the steps link
            # unchanged files, so the copy of `src` sits beside them).
            with tempfile.TemporaryDirectory(prefix="dicom-relay-dry-") as tmp:
                copy = Path(tmp) / "in.dcm"
                shutil.copyfile(src, copy)
                return self._chain(copy, Path(tmp) / "out.dcm", sync=False)
        return self._chain(src, dst, sync)

    def _chain(self, src: Path, dst: Path, sync: bool) -> list[AttributeChange]:
        changes: list[AttributeChange] = []
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
                    changes += dataset_step(step, current, out, sync=sync and last)
                current = out
        finally:
            for tmp in temporaries:
                tmp.unlink(missing_ok=True)
        if self.deidentifies:
            _burned_in_gate(current)
        return changes


def _burned_in_gate(path: Path) -> None:
    """A de-identified copy must not carry burned-in text: BadInput("burned-in") when it may
    (its header says so, or says nothing on a kind of object where it is common)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path, defer_size=1024)  # the header; pixel data stays on disk
    risk = burned_in_risk(ds)
    if risk is not None:
        raise BadInput("burned-in", f"{risk}; a de-identified destination gets it only once "
                       "its redact rules blank the text (docs/routing.md)")


def dataset_step(rule: Deidentification | PixelRedaction, src: Path, dst: Path | None,
                 sync: bool = True) -> list[AttributeChange]:
    """One de-identification or redaction step from file to file; the top-level attributes
    it changed (a redaction: the regions blanked, as a change of PixelData)."""
    ds = read_dicom(src)
    before = _top_level_text(ds)
    blanked = None
    try:
        if isinstance(rule, Deidentification):
            rule.apply(ds)
        else:
            blanked = rule.apply(ds, src)
    except (ValueError, TypeError, KeyError, NotImplementedError) as exc:
        reason = "deidentify-failed" if isinstance(rule, Deidentification) else "redact-failed"
        raise BadInput(reason, f"{type(exc).__name__}: {exc}") from None
    after = _top_level_text(ds)
    changes = [AttributeChange(keyword, before.get(keyword), after.get(keyword))
               for keyword in sorted(set(before) | set(after))
               if before.get(keyword) != after.get(keyword) and keyword != "PixelData"]
    if blanked is not None:
        changes.append(AttributeChange("PixelData", "(as received)", blanked))
    if dst is not None:
        try:
            write_dataset(ds, dst, sync)
        except (ValueError, TypeError, OverflowError) as exc:
            raise BadInput("write-failed", f"{type(exc).__name__}: {exc}") from None
    return changes


def _top_level_text(ds: Dataset) -> dict[str, str]:
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

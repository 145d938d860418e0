"""Holding a destination's objects until their study is complete (`hold_until_stable`).

A study is released, all its objects together (one association), once no new object of it
arrived for `hold_until_stable` seconds, or `hold_max` after its first object arrived, so that
a study that keeps growing is not held for ever. Arrival is the time the object was queued
for the destination: its file's modification time in out/<dest>/, so after a restart the
timers resume from the spool, not from zero. Pure bookkeeping; the sender asks it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from relay.events import Identity

UNKNOWN_STUDY = "(no StudyInstanceUID)"


def study_of(path: Path) -> str:
    """The object's StudyInstanceUID (its header only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - unreadable: held on its own, sent, and failed there
            return UNKNOWN_STUDY
    return str(ds.get("StudyInstanceUID", "") or UNKNOWN_STUDY)


def sent_identity(path: Path) -> Identity | None:
    """The SOP Instance and Class UIDs of a queued copy (its header only); None if
    unreadable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = dcmread(path, stop_before_pixels=True,
                         specific_tags=["SOPInstanceUID", "SOPClassUID"])
        except Exception:  # noqa: BLE001 - not ours to judge here: the send said stored
            return None
    return Identity(sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
                    sop_class_uid=str(ds.get("SOPClassUID", "") or ""))


def arrival(path: Path) -> float:
    return path.stat().st_mtime


@dataclass
class HeldStudy:
    uid: str
    first: float
    last: float
    paths: list[Path] = field(default_factory=list)

    def due(self, hold: float, hold_max: float) -> float:
        """When it may go: quiet for `hold`, or `hold_max` after its first object."""
        return min(self.last + hold, self.first + hold_max)


class StudyHold:
    def __init__(self, hold: float, hold_max: float) -> None:
        self.hold = hold
        self.hold_max = hold_max
        self.studies: dict[str, HeldStudy] = {}
        self.forced: set[str] = set()  # released by hand: due at once

    def add(self, path: Path, study: str, arrived: float) -> None:
        held = self.studies.get(study)
        if held is None:
            self.studies[study] = HeldStudy(study, arrived, arrived, [path])
            return
        held.paths.append(path)
        held.first = min(held.first, arrived)
        held.last = max(held.last, arrived)

    def next_due(self) -> float | None:
        return min((self._due(s) for s in self.studies.values()), default=None)

    def _due(self, study: HeldStudy) -> float:
        return -1.0 if study.uid in self.forced else study.due(self.hold, self.hold_max)

    def release_now(self, study: str) -> int:
        """Send this study at the next chance, complete or not (the console's "release");
        the number of its objects held (0: not held here)."""
        held = self.studies.get(study)
        if held is None:
            return 0
        self.forced.add(study)
        return len(held.paths)

    def release(self, now: float) -> Iterator[HeldStudy]:
        """The studies due at `now`, oldest first, each taken out of the hold."""
        due = sorted((s for s in self.studies.values() if self._due(s) <= now),
                     key=lambda s: s.first)
        for study in due:
            del self.studies[study.uid]
            self.forced.discard(study.uid)
            study.paths.sort(key=lambda p: p.name)
            yield study


def held_studies(paths: list[Path]) -> list[HeldStudy]:
    """The studies in a destination's queue with their arrival times (for `status`)."""
    hold = StudyHold(0, 0)
    for path in paths:
        try:
            hold.add(path, study_of(path), arrival(path))
        except FileNotFoundError:
            continue  # sent meanwhile
    return sorted(hold.studies.values(), key=lambda s: s.first)

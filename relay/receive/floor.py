"""The free-space floor ([spool] min_free_mb): below it the receiver takes no new object,
before the disk is full.

A modality deletes an image once it got C-STORE success. The toolkits' storescp (DCMTK,
dcm4che) acknowledged objects they could not write whole when the disk filled (cut at a page
boundary): images the modality no longer has, that never reach the PACS. So the relay never
lets the disk fill: the embedded receiver answers 0xA700 (out of resources) to a C-STORE
that would leave less than the floor; a toolkit's storescp is stopped (its port closed:
modalities get "connection refused" and try later) as soon as an object it wrote leaves
less than the floor, and started again once there is room (FloorKeeper). What storescp was
writing when stopped was never acknowledged: it is quarantined as unfinished, and the
modality sends it again.

The floor is min_free_mb when set, else the larger of 1 GiB and twice the largest object
seen since the receiver started.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from inotify_simple import flags

from relay.receive.inotify import WakeableINotify

if TYPE_CHECKING:
    from relay.config.model import Config

log = logging.getLogger("relay.receive")

DEFAULT_FLOOR = 1024 * 1024 * 1024
MB = 1024 * 1024


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path`."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def floor_of(config: Config) -> Floor:
    mb = config.spool.min_free_mb
    return Floor(config.spool.path, None if mb is None else int(mb * MB))


@dataclass
class Floor:
    path: Path  # the spool (any folder on its file system)
    configured: int | None = None  # bytes, from [spool] min_free_mb; None: the default
    largest: int = 0  # the largest object seen
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def bytes(self) -> int:
        if self.configured is not None:
            return self.configured
        return max(DEFAULT_FLOOR, 2 * self.largest)

    def seen(self, size: int) -> None:
        with self._lock:
            self.largest = max(self.largest, size)

    def free(self) -> int:
        return free_bytes(self.path)

    def room_for(self, size: int) -> bool:
        """Whether an object of `size` bytes leaves the floor free."""
        return self.free() - size >= self.bytes

    def describe(self) -> str:
        return (f"{self.free() / MB:.1f} MB free on the spool's file system, floor "
                f"{self.bytes / MB:.1f} MB ([spool] min_free_mb)")


class FloorKeeper:
    """Watches what a toolkit's storescp writes (`folder`) and the free space: stops the
    receiver (`pause`) when an object leaves less than the floor, starts it again (`resume`)
    when there is room for the floor and two more of the largest objects."""

    def __init__(self, floor: Floor, folder: Path, pause: Callable[[str], None],
                 resume: Callable[[], None], interval: float = 1.0) -> None:
        self.floor = floor
        self.folder = folder
        self.pause = pause
        self.resume = resume
        self.interval = interval
        self.paused = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inotify: WakeableINotify | None = None

    def start(self) -> None:
        self._inotify = WakeableINotify()
        self._inotify.add_watch(str(self.folder), flags.CLOSE_WRITE | flags.MOVED_TO)
        self._stop.clear()
        self.check()
        self._thread = threading.Thread(target=self._run, name="free-space-floor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._inotify is not None:
            self._inotify.wake()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    def _run(self) -> None:
        assert self._inotify is not None
        last = time.monotonic()
        while not self._stop.is_set():
            events = self._inotify.read(int(self.interval * 1000))
            for event in events:
                if event.name:
                    try:
                        self.floor.seen((self.folder / event.name).stat().st_size)
                    except OSError:
                        continue  # moved on already
            if events or time.monotonic() - last >= self.interval:
                last = time.monotonic()
                try:
                    self.check()
                except OSError as exc:
                    log.error("free-space floor: cannot read the spool's free space: %s", exc)

    def check(self) -> None:
        if not self.paused and not self.floor.room_for(0):
            self.paused = True
            self.pause(f"below the free-space floor: {self.floor.describe()}")
        elif self.paused and self.floor.room_for(2 * self.floor.largest):
            self.paused = False
            log.warning("room again (%s): the receiver takes objects again",
                        self.floor.describe())
            self.resume()

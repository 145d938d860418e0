"""The watcher: inotify on spool/incoming/, plus a start-up scan of what is already there.

The watch is added *before* the scan, so an object that lands between the two is seen at least
once (twice is harmless: claiming is an atomic rename and the loser gets None).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

from inotify_simple import flags

from relay.receive.inotify import WakeableINotify
from relay.spool import Spool, is_ready

log = logging.getLogger("relay.watch")

# A finished object shows up either renamed in (our receivers, dcm4che's .part rename) or
# closed after writing (a file copied in by hand).
WATCH_FLAGS = flags.MOVED_TO | flags.CLOSE_WRITE


class IncomingWatcher:
    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.inotify = WakeableINotify()
        self.inotify.add_watch(str(spool.incoming), WATCH_FLAGS)

    def close(self) -> None:
        self.inotify.close()

    def wake(self) -> None:
        """End paths() now (its stop event is set): it is waiting for an arrival."""
        self.inotify.wake()

    def paths(self, stop: threading.Event, poll_ms: int = 500) -> Iterator[Path]:
        """Every finished object in incoming/: what is there now, then each new arrival,
        until `stop` is set."""
        yield from self.spool.ready_incoming()
        while not stop.is_set():
            overflow = False
            for event in self.inotify.read(poll_ms):
                if event.mask & flags.Q_OVERFLOW:
                    overflow = True
                    continue
                if not event.name:
                    continue
                path = self.spool.incoming / event.name
                if is_ready(path):
                    yield path
            if overflow:
                # The kernel dropped events: the folder itself is the truth, scan it again.
                log.warning("inotify queue overflowed: rescanning %s", self.spool.incoming)
                yield from self.spool.ready_incoming()

"""inotify whose waiting a stop ends at once.

The receive stage's loops (the watcher of incoming/, the DCMTK handover, the free-space
floor) waited on `INotify.read(timeout)` and looked at their stop flag between reads: each
stop of the relay waited out the timeouts, up to a second per loop. Here a read waits on the
inotify descriptor and on a pipe that `wake()` writes to, so a stop is seen as it happens."""

from __future__ import annotations

import contextlib
import os
import select

from inotify_simple import Event, INotify


class WakeableINotify:
    def __init__(self) -> None:
        self.inotify = INotify()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._poll = select.poll()
        self._poll.register(self.inotify.fileno(), select.POLLIN)
        self._poll.register(self._wake_r, select.POLLIN)
        self.woken = False

    def add_watch(self, path: str, mask: int) -> int:
        return int(self.inotify.add_watch(path, mask))

    def read(self, timeout_ms: int | None = None) -> list[Event]:
        """The events there are, waiting up to timeout_ms for some (None: until there are);
        [] at once after wake(), now and at every later read."""
        if self.woken:
            return []
        ready = {fd for fd, _ in self._poll.poll(timeout_ms)}
        if self._wake_r in ready:
            self.woken = True
            return []
        return self.inotify.read(timeout=0) if ready else []

    def wake(self) -> None:
        """End a read() under way in another thread (and every later one) at once."""
        with contextlib.suppress(OSError):  # already woken (pipe full), or closed
            os.write(self._wake_w, b"\0")

    def close(self) -> None:
        self.wake()
        self.inotify.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

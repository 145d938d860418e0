"""Caps for a receiver that forks a process per association (DCMTK's storescp --fork), kept
from outside: storescp has no limit of its own (60 slow connections made 60 processes), and
a connection that sends its A-ASSOCIATE-RQ a byte at a time outlives every timeout it has.

Every `interval` the warden lists the receiver's children (/proc), the peer of each (its
TCP socket in /proc/net/tcp*) and whether it has negotiated (storescp logs "Association
Received" with the child's pid: `negotiated()` is told). It kills (SIGKILL) a child that has
not negotiated `negotiation` seconds after it started, the newest of a host's children past
`per_host`, and the newest of all past `total`. A killed child's peer got no success for
anything unfinished and sends it again; what it had acknowledged is complete and handed over.
Linux only: elsewhere it does nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("relay.receive")
PROC = Path("/proc")


@dataclass(frozen=True)
class Child:
    pid: int
    age: float  # seconds since it started
    host: str | None  # the peer's address, None when not known (yet)


def _ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _uptime(proc: Path) -> float:
    return float((proc / "uptime").read_text().split()[0])


def _stat(proc: Path, pid: str) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, or None (gone,
    or ended and not yet reaped)."""
    try:
        text = (proc / pid / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19])


def _peers(proc: Path) -> dict[str, str]:
    """Socket inode -> remote address, for established TCP connections."""
    peers = {}
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = (proc / "net" / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "01":
                peers[fields[9]] = _address(fields[2].rsplit(":", 1)[0], v6)
    return peers


def _address(hexaddr: str, v6: bool) -> str:
    raw = bytes.fromhex(hexaddr)
    if not v6:
        return ".".join(str(b) for b in raw[::-1])
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # each 32-bit word is host-endian
    packed = b"".join(words)
    if packed[:12] == b"\x00" * 10 + b"\xff\xff":  # an IPv4 peer on a v6 socket
        return ".".join(str(b) for b in packed[12:])
    return str(ipaddress.IPv6Address(packed))


def _sockets(proc: Path, pid: int) -> list[str]:
    inodes = []
    try:
        for fd in (proc / str(pid) / "fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.append(target[8:-1])
    except OSError:
        pass
    return inodes


def _listed_children(proc: Path, parent: int) -> list[str] | None:
    """The pids the kernel lists as children of `parent`'s main thread (the one storescp
    forks from), or None where it keeps no such list (a kernel without CONFIG_PROC_CHILDREN):
    one small read instead of listing /proc and reading every process's stat, which at four
    scans a second was most of an idle DCMTK relay's CPU."""
    try:
        return (proc / str(parent) / "task" / str(parent) / "children").read_text().split()
    except OSError:  # no such file: not kept by this kernel (or the parent is gone)
        return None


def children(parent: int, proc: Path = PROC) -> list[Child]:
    """The processes `parent` forked, with their age and peer host."""
    try:
        now = _uptime(proc)
    except OSError:
        return []
    ticks = _ticks()
    found = []
    listed = _listed_children(proc, parent)
    for name in listed if listed is not None else (e.name for e in proc.iterdir()):
        if not name.isdigit():
            continue
        stat = _stat(proc, name)
        if stat is None or stat[0] != parent:
            continue
        found.append((int(name), now - stat[1] / ticks))
    if not found:
        return []
    peers = _peers(proc)
    out = []
    for pid, age in found:
        hosts = [peers[i] for i in _sockets(proc, pid) if i in peers]
        out.append(Child(pid, age, hosts[0] if hosts else None))
    return out


def to_kill(kids: list[Child], negotiated: set[int], *, negotiation: float, per_host: int,
            total: int) -> dict[int, str]:
    """Which children go, and why: pure, on what `children` saw."""
    doomed: dict[int, str] = {}
    for kid in kids:
        if kid.pid not in negotiated and kid.age > negotiation:
            doomed[kid.pid] = (f"no association request from {kid.host or 'its peer'} within "
                               f"{negotiation:g} s")
    alive = sorted((k for k in kids if k.pid not in doomed), key=lambda k: -k.age)  # oldest first
    by_host: dict[str | None, int] = {}
    kept = 0
    for kid in alive:
        held = by_host.get(kid.host, 0)
        if kid.host is not None and held >= per_host:
            doomed[kid.pid] = (f"{kid.host} already holds {held} associations "
                               f"(receiver.max_associations_per_host = {per_host})")
        elif kept >= total:
            doomed[kid.pid] = f"{total} associations are open (receiver.max_associations)"
        else:
            by_host[kid.host] = held + 1
            kept += 1
    return doomed


class Warden:
    def __init__(self, parent: Callable[[], int | None], *, negotiation: float, per_host: int,
                 total: int, interval: float = 0.25, proc: Path = PROC) -> None:
        self.parent = parent
        self.negotiation = negotiation
        self.per_host = per_host
        self.total = total
        self.interval = interval
        self.proc = proc
        self._negotiated: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._said = 0.0
        self.killed = 0

    def negotiated(self, pid: int) -> None:
        with self._lock:
            self._negotiated.add(pid)

    def start(self) -> None:
        if not (self.proc / "self" / "stat").exists():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="receiver-warden", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the warden must outlive an odd /proc entry
                log.exception("receiver warden")

    def check(self) -> None:
        parent = self.parent()
        if parent is None:
            return
        kids = children(parent, self.proc)
        with self._lock:
            alive = {k.pid for k in kids}
            self._negotiated &= alive
            negotiated = set(self._negotiated)
        for pid, why in to_kill(kids, negotiated, negotiation=self.negotiation,
                                per_host=self.per_host, total=self.total).items():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.killed += 1
            now = time.monotonic()
            if now - self._said >= 10:  # a flood must not flood the log
                self._said = now
                log.warning("receiver process %d closed: %s", pid, why)

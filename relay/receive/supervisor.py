"""Runs and restarts a toolkit's receiver subprocess (storescp), as systemd would, but per object.

- started from an argv list, never through a shell, in its own process group;
- its output goes through our logger, a line at a time;
- if it dies it is restarted with capped exponential backoff (a `before_start` hook runs
  first, so the adapter can deal with what the dead one left half-written);
- `stop()` sends SIGTERM to the whole group, then SIGKILL after a grace period, and waits:
  no orphan keeps the port;
- if the relay itself is killed, the kernel sends the child SIGTERM (PR_SET_PDEATHSIG);
- it refuses to start when the port is taken, saying so.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.receive import landlock
from relay.receive.floor import FloorKeeper, floor_of

if TYPE_CHECKING:
    from relay.config.model import Config

log = logging.getLogger("relay.supervisor")

# (line, level of the line before) → level to log this line at.
LineLevel = Callable[[str, int], int]

PR_SET_PDEATHSIG = 1
# Set for a supervised `dicom-relay` child: it logs without time stamps (ours add them).
LOG_PLAIN_ENV = "DICOM_RELAY_SUPERVISED"


def _die_with_parent(sig: int = signal.SIGTERM) -> None:  # in the child, before exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, sig)


def _receiver_child(sig: int) -> None:  # in a receiver, before exec
    _die_with_parent(sig)
    # What it writes (received objects) is readable by the relay's user only, as the
    # embedded receiver's objects are: a toolkit's own default would be 0644.
    os.umask(0o077)


def run_tool(argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None,
             text: bool = True) -> subprocess.CompletedProcess[Any]:
    """Run a toolkit command to completion: argv list, output captured, and it ends with the
    relay if the relay is killed (a sender left running would deliver behind our back)."""
    return subprocess.run(  # noqa: PLW1509 - prctl only, no Python in the child
        [str(a) for a in argv], capture_output=True, text=text, env=env, timeout=timeout,
        check=False, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)


class ToolLines:
    """A toolkit command whose output (stdout and stderr together) is read line by line while
    it runs: argv list, killed at `timeout` seconds (then `timed_out`), ending with the relay
    if the relay is killed, as run_tool's. Iterate it to the end, or close() it; `lines`
    holds every line read."""

    def __init__(self, argv: Sequence[str], *, timeout: float,
                 env: dict[str, str] | None = None, confine_to: Path | None = None) -> None:
        """confine_to: the tool may write only under this folder (landlock.confine_writes;
        the caller checked landlock.available())."""

        def before_exec() -> None:
            _die_with_parent()
            if confine_to is not None:
                landlock.confine_writes(confine_to)

        self.proc = subprocess.Popen(  # noqa: PLW1509 - prctl and Landlock, then exec
            [str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=env, text=True, errors="replace",
            preexec_fn=before_exec)
        self.timed_out = False
        self.lines: list[str] = []
        self._timer = threading.Timer(timeout, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.timed_out = True
        self.proc.kill()

    def __iter__(self) -> Iterator[str]:
        assert self.proc.stdout is not None
        try:
            for raw in self.proc.stdout:
                line = raw.rstrip("\n")
                self.lines.append(line)
                yield line
            self.proc.wait()  # its output ended: it is exiting (the timer still stands)
        finally:
            self.close()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def close(self) -> None:
        """Stop it if it still runs (a caller that gave up), and reap it."""
        self._timer.cancel()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def port_in_use(host: str, port: int) -> bool:
    """Whether binding (host, port) would fail because someone listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float,
                   host: str = "127.0.0.1") -> bool:
    """Whether proc listens on (host, port) within timeout; a wildcard host is tried on
    loopback."""
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host  # noqa: S104
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection((target, port), 0.2):
            return True
        time.sleep(0.05)
    return False


class Supervisor:
    def __init__(self, name: str, argv: Sequence[str], *, port: int, host: str = "0.0.0.0",  # noqa: S104
                 env: dict[str, str] | None = None,
                 before_start: Callable[[], None] | None = None,
                 backoff_initial: float = 1.0, backoff_max: float = 30.0,
                 stop_timeout: float = 5.0, start_timeout: float = 15.0,
                 death_signal: int = signal.SIGTERM, ready_line: str | None = None,
                 line_level: LineLevel | None = None,
                 on_line: Callable[[str], None] | None = None,
                 freeze_first: bool = False) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.port = port
        self.host = host
        self.env = env
        self.before_start = before_start
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stop_timeout = stop_timeout
        self.start_timeout = start_timeout
        self.death_signal = death_signal  # what the child gets if the relay is killed
        # Started when it prints a line with this (else: when its port takes a connection,
        # which a receiver that counts associations would count as one until it times out).
        self.ready_line = ready_line
        # The level each output line is logged at (default INFO): a tool that prints every
        # PDU at its own DEBUG level keeps that level in our log.
        self.line_level = line_level
        self.on_line = on_line  # sees every output line (a receiver learns from them)
        # Stopped by freezing the whole group (SIGSTOP), then killing it (SIGKILL): no
        # process of it may go on after another one died (see DcmtkReceiver).
        self.freeze_first = freeze_first
        self._ready = threading.Event()
        self.restarts = 0  # times it died and was started again (a metric)
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._paused = threading.Event()  # stopped on purpose (the free-space floor)
        self._lock = threading.Lock()
        self._monitor: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        if port_in_use(self.host, self.port):
            raise OSError(errno.EADDRINUSE,
                          f"port {self.port} is already in use: is another relay or storescp "
                          "running? (change [receiver].port)")
        self._spawn()
        assert self.proc is not None
        if not self._wait_ready():
            code = self.proc.poll()
            self._kill_group()
            raise OSError(f"{self.name} did not start listening on port {self.port}"
                          + (f" (exited with {code})" if code is not None else "")
                          + "; its output is in the log above")
        log.info("%s started (pid %d): %s", self.name, self.proc.pid, " ".join(self.argv))
        self._monitor = threading.Thread(target=self._watch, name=f"supervise-{self.name}",
                                         daemon=True)
        self._monitor.start()

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        if self.ready_line is None:
            return wait_listening(self.port, self.proc, self.start_timeout, self.host)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self._ready.wait(0.05):
                return True
        return False

    def _spawn(self) -> None:
        if self.before_start is not None:
            self.before_start()
        self._ready.clear()
        proc = subprocess.Popen(
            self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, start_new_session=True,
            preexec_fn=functools.partial(_receiver_child, self.death_signal))  # noqa: PLW1509
        with self._lock:
            self.proc = proc
        threading.Thread(target=self._pump, args=(proc,), name=f"log-{self.name}",
                         daemon=True).start()

    def _pump(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        level = logging.INFO
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                if self.line_level is not None:
                    level = self.line_level(line, level)
                if log.isEnabledFor(level):
                    log.log(level, "%s: %s", self.name, line)
                if self.on_line is not None:
                    self.on_line(line)
                if self.ready_line is not None and self.ready_line in line:
                    self._ready.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self, why: str) -> None:
        """Stop it, and keep it stopped (its port closed) until resume(): modalities get
        "connection refused" at once and send later; what it had not answered for, they
        send again. (Frozen instead, it kept their associations hanging for minutes: a
        sender's write to a peer that reads nothing times out only in TCP.)"""
        if self._paused.is_set():
            return
        self._paused.set()
        log.warning("%s stopped: %s; modalities are refused until there is room", self.name,
                    why)
        with self._lock:
            self._kill_group()

    def resume(self) -> None:
        """Start it again after pause() (the monitor thread does, after the sweep of what
        the stopped one left)."""
        self._paused.clear()

    def _watch(self) -> None:
        delay = self.backoff_initial
        while not self._stopping.is_set():
            proc = self.proc
            assert proc is not None
            started = time.monotonic()
            code = proc.wait()
            if self._stopping.is_set():
                return
            # Children it forked for associations (storescp --fork) would go on writing while
            # the next one starts: end them too. Their modalities got no success and resend.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if self._paused.is_set():
                while self._paused.is_set():
                    if self._stopping.wait(0.2):
                        return
                self._spawn_again("started again")
                continue
            if time.monotonic() - started > 60:
                delay = self.backoff_initial  # it ran fine for a while: start over
            log.error("%s (pid %d) exited with %s; restarting in %.1f s", self.name, proc.pid,
                      code, delay)
            if self._stopping.wait(delay):
                return
            delay = min(self.backoff_max, delay * 2)
            if self._spawn_again("restarted"):
                self.restarts += 1

    def _spawn_again(self, what: str) -> bool:
        try:
            self._spawn()
        except OSError as exc:
            log.error("cannot start %s again: %s", self.name, exc)
            return False
        log.info("%s %s (pid %s)", self.name, what, self.pid)
        return True

    def _kill_group(self) -> None:
        proc = self.proc
        if proc is None:
            return
        signals = ((signal.SIGTERM, self.stop_timeout), (signal.SIGKILL, 5.0))
        if self.freeze_first:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGSTOP)
            signals = ((signal.SIGKILL, 5.0), (signal.SIGKILL, 5.0))
        for sig, wait in signals:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on %s", self.name, sig.name)

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._kill_group()
        if self._monitor is not None:
            self._monitor.join(timeout=self.stop_timeout + 10)


class SupervisedReceiver:
    """A receiver run as a supervised subprocess (relay.toolkits.base.Receiver)."""

    toolkit = "?"
    name = "storescp"
    enforces_allow_lists = False  # storescp cannot; the embedded receiver's child does
    death_signal = signal.SIGTERM
    ready_line: str | None = None  # see Supervisor

    def __init__(self, config: Config, argv: Sequence[str], *, host: str,
                 env: dict[str, str] | None = None, line_level: LineLevel | None = None,
                 on_line: Callable[[str], None] | None = None,
                 writes_to: Path | None = None, freeze_first: bool = False) -> None:
        """writes_to: where the tool puts the objects it completes; the free-space floor is
        kept by watching it (None: the receiver keeps the floor itself, as the embedded
        one does)."""
        for key in ("allowed_calling_aets", "allowed_hosts"):
            if getattr(config.receiver, key) and not self.enforces_allow_lists:
                raise OSError(f"receiver.{key}: {self.toolkit}'s storescp cannot enforce it; "
                              "use engine = \"embedded\" for that (or a firewall)")
        self.supervisor = Supervisor(self.name, argv, port=config.receiver.port, host=host,
                                     env=env, before_start=self.sweep,
                                     death_signal=self.death_signal,
                                     ready_line=self.ready_line, line_level=line_level,
                                     on_line=on_line, freeze_first=freeze_first)
        self.floor_keeper = (FloorKeeper(floor_of(config), writes_to, self.supervisor.pause,
                                         self.supervisor.resume)
                             if writes_to is not None else None)

    def sweep(self) -> None:
        """Before each (re)start: deal with what a dead receiver left half-written."""

    def start(self) -> None:
        self.supervisor.start()
        if self.floor_keeper is not None:
            self.floor_keeper.start()

    def stop(self) -> None:
        if self.floor_keeper is not None:
            self.floor_keeper.stop()
        self.supervisor.stop()

    def restarts(self) -> int:
        return self.supervisor.restarts

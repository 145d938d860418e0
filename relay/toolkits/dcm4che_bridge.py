"""The relay's side of the dcm4che engine's long-lived JVM (relay.toolkits.dcm4che_jvm).

One helper process per relay process, started when first needed and kept: requests go down
its stdin as JSON lines, answers come up its stdout, its stderr (Java's warnings, a crash
report) goes to our log. A helper that dies is started again for the next request; one that
stops answering for longer than a request allows is killed (a hung JVM) and started again.
Either way the request in hand ends with a "died" answer that says what happened, so that
the engine can set aside the object that was on the wire and keep the others queued.

Why a process and JPype inside it, not a JVM inside the relay nor a Java program: a JVM in
the relay's process could not be restarted after a crash and would take the relay down with
it; a Java program of ours would need a compiler where the Docker image has only a Java
runtime. JPype (a maintained Python-Java bridge) drives dcm4che's own classes from Python.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import queue
import subprocess
import sys
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("relay.dcm4che.jvm")

# Answers that end a request.
FINAL = frozenset({"done", "error", "lost", "died"})


class BridgeUnavailable(Exception):
    """The helper process could not start its JVM (no Java, no toolkit jars): a local tool
    failure, with what it said."""


class JvmBridge:
    def __init__(self, home: Path, env: dict[str, str], start_timeout: float = 60) -> None:
        self.home = home
        self.env = env
        self.start_timeout = start_timeout
        self.starts = 0  # helper processes started (the first one and every restart)
        self._proc: subprocess.Popen[bytes] | None = None
        # Request id → (the helper it went to, where its answers go). The start-up answer has
        # id 0. A helper that ends tells only its own requests.
        self._pending: dict[int, tuple[subprocess.Popen[bytes], queue.Queue[dict[str, Any]]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # starting the helper, writing requests
        self._table = threading.Lock()  # the pending table
        self._stderr: collections.deque[str] = collections.deque(maxlen=12)
        self._closed = False  # close() was called: start_soon() must not start one after it
        # A helper whose JVM is coming up (self._lock held meanwhile): close() ends it rather
        # than wait up to start_timeout for a JVM it would only stop.
        self._starting: subprocess.Popen[bytes] | None = None
        # Helpers known to be gone (killed by call(), or their answers ended) before Popen
        # knows it: see _alive().
        self._ended: weakref.WeakSet[subprocess.Popen[bytes]] = weakref.WeakSet()

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and self._alive(proc) else None

    def _alive(self, proc: subprocess.Popen[bytes]) -> bool:
        """Whether a request can still go to this helper. poll() alone says "running" for a
        helper that is dying or already dead: a SIGKILL takes a moment, and while the answer
        reader reaps it (Popen.wait() holds the wait lock) poll() answers None. A request
        written to it then got its "died" back with no object on the wire, which the sender
        takes for a destination down."""
        return proc not in self._ended and proc.poll() is None

    def running(self) -> bool:
        return self.pid is not None

    # --- the helper process ----------------------------------------------------------------

    def _start(self) -> subprocess.Popen[bytes]:
        """Start the helper (self._lock held) and wait for its JVM to be up."""
        argv = [sys.executable, "-m", "relay.toolkits.dcm4che_jvm", str(self.home)]
        try:
            # A session of its own: Ctrl-C in the relay's terminal (SIGINT to the whole
            # foreground group) is the relay's to act on; the helper ends when its input does.
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=self.env,
                                    start_new_session=True)
        except OSError as exc:
            raise BridgeUnavailable(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
        self.starts += 1
        self._stderr.clear()
        self._starting = proc
        started: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._table:
            self._pending[0] = (proc, started)
        assert proc.stdout is not None and proc.stderr is not None
        threading.Thread(target=self._read_answers, args=(proc, proc.stdout), daemon=True,
                         name="dcm4che-jvm-answers").start()
        threading.Thread(target=self._read_log, args=(proc.stderr,), daemon=True,
                         name="dcm4che-jvm-log").start()
        try:
            first = started.get(timeout=self.start_timeout)
        except queue.Empty:
            proc.kill()
            raise BridgeUnavailable(f"its JVM did not start within {self.start_timeout:.0f} s"
                                    ) from None
        finally:
            self._starting = None
            with self._table:
                self._pending.pop(0, None)
        if first["ev"] != "ready":
            proc.kill()
            proc.wait()
            raise BridgeUnavailable(first.get("message") or self._last_words(proc))
        log.info("dcm4che's JVM is up (pid %d, Java %s, %s)", proc.pid, first.get("java"),
                 first.get("jvm"))
        return proc

    def _read_answers(self, proc: subprocess.Popen[bytes], stream: IO[bytes]) -> None:
        for line in stream:
            try:
                answer = json.loads(line)
            except ValueError:
                log.warning("dcm4che's JVM: an answer that is not JSON: %r", line[:200])
                continue
            with self._table:
                to, waiting = self._pending.get(int(answer.get("id", -1)), (None, None))
            if waiting is not None and to is proc:
                waiting.put(answer)
        self._ended.add(proc)  # its answers ended: no request goes to it any more
        code = proc.wait()
        threading.Event().wait(0.1)  # its last stderr lines say why: let them arrive
        why = self._last_words(proc)
        with self._table:
            waiting_all = [waiting for to, waiting in self._pending.values() if to is proc]
        if (waiting_all or code not in (0, -9, -15)) and not self._closed:
            log.warning("dcm4che's JVM exited (%s); it is started again when next needed",
                        why)
        for waiting in waiting_all:
            waiting.put({"ev": "died", "message": why})

    def _read_log(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").rstrip()
            if not line:
                continue
            self._stderr.append(line)
            level = logging.DEBUG if line.lstrip().startswith("at ") else logging.WARNING
            log.log(level, "dcm4che: %s", line)

    def _last_words(self, proc: subprocess.Popen[bytes]) -> str:
        code = proc.returncode
        how = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit {code}")
        lines = [line for line in self._stderr if not line.lstrip().startswith("at ")]
        return f"{how}: {' | '.join(lines[-3:])}" if lines else how

    def start_soon(self) -> None:
        """Start the helper in the background: the first send then finds its JVM up. A
        failure is logged here, and told again (a local tool failure) by the send needing it."""
        threading.Thread(target=self._start_if_needed, daemon=True,
                         name="dcm4che-jvm-start").start()

    def _start_if_needed(self) -> None:
        with self._lock:
            if self._closed or (self._proc is not None and self._alive(self._proc)):
                return
            try:
                self._proc = self._start()
            except BridgeUnavailable as exc:
                if not self._closed:  # else close() ended it on purpose
                    log.warning("dcm4che's JVM could not start: %s", exc)

    # --- requests --------------------------------------------------------------------------

    def call(self, request: dict[str, Any], idle_limit: float,
             start: bool = True) -> Iterator[dict[str, Any]]:
        """Send one request; yield its answers up to the final one ("done", "error", "lost",
        or "died" when the helper exited or was killed for not answering within idle_limit
        seconds). Raises BridgeUnavailable when the helper cannot start; with start=False,
        yields nothing when no helper runs."""
        answers: queue.Queue[dict[str, Any]] = queue.Queue()
        with self._lock:
            if self._proc is None or not self._alive(self._proc):
                if not start:
                    return
                self._proc = self._start()
            proc = self._proc
            rid = next(self._ids)
            with self._table:
                self._pending[rid] = (proc, answers)
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({**request, "id": rid}).encode() + b"\n")
                proc.stdin.flush()
            except OSError:
                pass  # it died: its answer reader tells every request so
        try:
            while True:
                try:
                    answer = answers.get(timeout=idle_limit)
                except queue.Empty:
                    log.error("dcm4che's JVM gave no answer for %.0f s: killed (pid %d)",
                              idle_limit, proc.pid)
                    proc.kill()
                    self._ended.add(proc)
                    yield {"ev": "died",
                           "message": f"hung: no answer for {idle_limit:.0f} s, killed"}
                    return
                yield answer
                if answer["ev"] in FINAL:
                    return
        finally:
            with self._table:
                self._pending.pop(rid, None)

    def close(self) -> None:
        self._closed = True
        starting = self._starting
        if starting is not None:
            starting.kill()  # its start, under self._lock, ends at once (its answers end)
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()  # it stops at the end of its input
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

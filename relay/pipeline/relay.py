"""The running relay: wires the stages (receiver -> incoming/ -> watcher -> editing workers ->
router -> out/<dest>/ -> senders) and the event stream's subscribers, starts and stops them,
and applies a reload.

Each stage talks to the next through the spool folders (the truth, which survives a crash) and
an in-memory queue (so nothing rescans a folder per file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relay import __version__
from relay.config.load import load_config
from relay.config.model import Config, ConfigError, Destination
from relay.edit.editor import Editor
from relay.events import EventBus, Reloaded
from relay.ops.audit import AuditLog
from relay.ops.logs import LogLines
from relay.ops.metrics import Metrics, RelayState
from relay.pipeline.processor import Committer, Processor, Setup
from relay.pipeline.reload import applicable, restart_only_changes, sender_changes
from relay.receive.floor import floor_of
from relay.receive.watch import IncomingWatcher
from relay.route.router import Router
from relay.send.sender import DestinationSender
from relay.send.stow import StowSender, transport_for
from relay.services.commitment import StorageCommitment
from relay.services.ledger import Ledger, LedgerWriter
from relay.services.scp import QueryRetrieve, Services, ServicesServer, services_servers
from relay.spool import Spool
from relay.toolkits.base import Engine, Receiver

if TYPE_CHECKING:
    from relay.history.writer import HistoryWriter

log = logging.getLogger("relay.pipeline")


def spool_for(config: Config) -> Spool:
    return Spool(config.spool.path, [d.name for d in config.destinations],
                 keep_delivered=config.spool.keep_delivered_hours > 0)


def rules_and_routes(config: Config, engine: Engine) -> tuple[Editor, Router]:
    """The global rules' editor and the router of a configuration, on this engine's
    converter when it asks for the toolkit's."""
    converter = engine.toolkit_converter() if config.toolkit.converter == "toolkit" else None
    return (Editor(config.rules, converter, config.receiver.max_object_mb * 1024 * 1024),
            Router(config.destinations, converter, called_ae=config.receiver.ae_title))


def history_writer(config: Config, backlog: str = "history-backlog.jsonl") -> HistoryWriter:
    """The history's writer for a configuration (its database is reached on first write:
    one that is down at start-up stops nothing). backlog: the file that keeps what the
    database could not take yet, one per writing process."""
    # Imported here: SQLAlchemy and alembic (~0.2 s) are for the processes that write the
    # history, not for the embedded engine's receiving child.
    from relay.history.store import HistoryStore
    from relay.history.writer import HistoryWriter

    return HistoryWriter(HistoryStore(config.history_url, config.relay_name),
                         config.spool.path / backlog,
                         patient_values=config.audit.patient_values,
                         keep_days=config.history.keep_days)


class Relay:
    """The running relay: any of receive, process (edit + send), or both (`run`)."""

    def __init__(self, config: Config, engine: Engine, *, receive: bool = True,
                 process: bool = True) -> None:
        self.config = config
        self.engine = engine
        self.do_receive = receive
        self.do_process = process
        self.spool = spool_for(config)
        self.stop_event = threading.Event()
        # What a signal asked (serve()'s handlers), acted on by wait(). Plain attributes, not
        # Events: a handler runs inside whatever the main thread was doing, and Event.set()
        # takes a lock the main thread may hold at that moment (inside its own Event.wait()),
        # which hung a relay on SIGTERM for good.
        self.stop_signal: int | None = None
        self.reload_requested = False
        # serve() has the interpreter write each signal's number to wake_fd
        # (signal.set_wakeup_fd): wait() wakes at once. Open as long as the process runs.
        self._woken, self.wake_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._reload_lock = threading.Lock()  # SIGHUP and the API may ask at once
        # What the last reload did (the API answers it): applied, why refused, what changed.
        self.last_reload: dict[str, object] = {}
        self.receiver: Receiver | None = None
        self.senders: list[DestinationSender] = []
        self._sender_threads: dict[str, threading.Thread] = {}
        self.threads: list[threading.Thread] = []
        self.watcher: IncomingWatcher | None = None
        self._work: queue.Queue[Path | None] = queue.Queue(maxsize=1000)
        self._editors = 0  # editing worker threads started
        self.committer: Committer | None = None
        self._commit_thread: threading.Thread | None = None
        # Every outcome of an object is an event; the audit, the metrics and the log lines
        # are its subscribers (the audit log once processing starts).
        self.events = EventBus()
        self.metrics = Metrics()
        self.events.subscribe(self.metrics)
        self.events.subscribe(LogLines(config.audit.patient_values))
        self.stow = StowSender()
        self.processor: Processor | None = None
        self.history: HistoryWriter | None = None
        # The proxy's other services: query/retrieve ([query]) and storage commitment
        # ([commitment]), each on its port where objects are processed; the embedded
        # receiver answers them on [receiver].port too.
        self.services = Services()
        self.services_servers: list[ServicesServer] = []
        self.ledger: Ledger | None = None

    def start(self) -> None:
        self.spool.create()
        if self.do_process:
            if not self.config.destinations:
                raise RuntimeError(f"{self.config.source}: no [[destinations]] configured: "
                                   "nothing to forward to")
            recovered = self.spool.recover()
            if recovered:
                log.info("start-up: %d object(s) left in work/ by a previous run requeued",
                         recovered)
            self._subscribe_audit_and_history("history-backlog.jsonl")
            if self.config.toolkit.converter == "toolkit" or \
                    any(d.kind == "dimse" for d in self.config.destinations):
                self.engine.prepare()
            self.senders = [self._sender(d, self.config) for d in self.config.destinations]
            for sender in self.senders:
                self._start_sender(sender)
            self.committer = Committer(self.spool)
            self._commit_thread = threading.Thread(target=self.committer.run, name="commit",
                                                   daemon=True)
            self._commit_thread.start()
            editor, router = rules_and_routes(self.config, self.engine)
            self.processor = Processor(
                self.spool, Setup(editor, router, {s.destination.name: s for s in self.senders},
                                  self.config.process.unrouted),
                self.events, self.committer, self.config.audit.patient_values)
            self._editors = self.config.process.workers  # a reload changes it next start
            for i in range(self._editors):
                self._thread(lambda p=self.processor: self._work_loop(p), f"edit-{i}")
            if self.config.spool.keep_delivered_hours > 0:
                self._thread(self._prune_delivered_loop, "keep-delivered")
            # Watch before the receiver starts so the first arrival is not missed.
            self.watcher = IncomingWatcher(self.spool)
            self._thread(self._watch_loop, "watch")
        if (self.config.query is not None or self.config.commitment is not None) \
                and not self.do_process:
            # A receive-only process (the embedded receiver's child) answers these too:
            # they are audited and in the history from here as well.
            self._subscribe_audit_and_history("history-backlog-receive.jsonl")
        if self.config.query is not None:
            self.services.query = QueryRetrieve(self.config, self.spool.root, self.events,
                                                self.engine if self.do_process else None)
        if self.config.commitment is not None:
            self.ledger = Ledger(self.spool.root)
            if self.do_process:
                self.events.subscribe(LedgerWriter(self.ledger, self.spool))
            self.services.commitment = StorageCommitment(
                self.config, self.ledger, self.events, handles_objects=self.do_process)
            self.services.commitment.start()
        if self.do_process:
            try:
                for server in services_servers(self.config, self.services):
                    self.services_servers.append(server)
                    server.start()
            except BaseException:
                self.stop()
                raise
        if self.do_receive:
            self.receiver = self.engine.receiver(self.config, self.spool,
                                                 beside_work=self.do_process,
                                                 services=self.services)
            try:
                self.receiver.start()
            except BaseException:
                self.stop()
                raise
        # Only where objects are processed: a `receive` beside a `process` (or the embedded
        # receiver's child) reads the same config and must not take the same port.
        if self.do_process and self.config.metrics.listen is not None:
            self.metrics.watch(self.state)
            try:
                self.metrics.serve(self.config.metrics.listen)
            except OSError as exc:
                self.stop()
                raise OSError(f"[metrics].listen {self.config.metrics.listen[0]}:"
                              f"{self.config.metrics.listen[1]}: cannot serve /metrics there "
                              f"({exc.strerror or exc})") from None

    def _subscribe_audit_and_history(self, backlog: str) -> None:
        self.events.subscribe(AuditLog(self.config.audit_path,
                                       patient_values=self.config.audit.patient_values))
        if self.config.history.enabled:
            self.history = history_writer(self.config, backlog)
            self.history.start()
            self.events.subscribe(self.history)

    def _sender(self, destination: Destination, config: Config) -> DestinationSender:
        """DIMSE destinations are sent to through the engine, DICOMweb ones over HTTP."""
        return DestinationSender(self.spool, destination,
                                 transport_for(destination, self.engine, self.stow),
                                 config.sender, events=self.events)

    def _start_sender(self, sender: DestinationSender) -> None:
        """Queue what out/<dest>/ holds, then start its thread."""
        name = sender.destination.name
        backlog = sender.load_backlog()
        if backlog:
            log.info("%d object(s) queued for %s", backlog, name)
        thread = threading.Thread(target=sender.run, name=f"send-{name}", daemon=True)
        thread.start()
        self._sender_threads[name] = thread

    def state(self) -> RelayState:
        """What the metrics read at each scrape."""
        receiver = self.receiver
        senders = list(self.senders)
        return RelayState(
            spool=self.spool,
            destinations=[s.destination.name for s in senders],
            held={s.destination.name: len(s.held()) for s in senders if s.hold is not None},
            receiver_port=self.config.receiver.port if self.do_receive else None,
            receiver_restarts=receiver.restarts() if receiver is not None else 0,
            version=__version__, engine=self.engine.name,
            floor=floor_of(self.config).bytes,
            commitment=self.ledger.figures() if self.ledger is not None else None)

    # --- reload (SIGHUP) -------------------------------------------------------------------

    def reload(self) -> bool:
        """Read the config file again and apply what a running relay can change, from the
        next object on: rules, destinations, filters, holds, [sender], [process].unrouted,
        log_level. What needs a restart is reported and kept as it was; a config that does
        not validate is refused and the running one stays. False when refused."""
        with self._reload_lock:
            return self._reload()

    def _reload(self) -> bool:
        try:
            new = load_config(self.config.source)
            if self.do_process and not new.destinations:
                raise ConfigError(f"{new.source}: no [[destinations]] configured: nothing "
                                  "to forward to")
        except ConfigError as exc:
            return self._refused(str(exc))
        restart = restart_only_changes(self.config, new)
        for line in restart:
            log.warning("%s", line)
        changes = sender_changes(self.config, new)
        new = applicable(self.config, new)
        if self.do_process:
            try:
                self._apply(new)
            except Exception as exc:  # noqa: BLE001 - a reload must never stop the relay
                log.exception("reload failed")
                return self._refused(str(exc))
        if new.log_level != self.config.log_level:
            logging.getLogger().setLevel(new.log_level)
        self.config = new
        self.last_reload = {
            "applied": True, "config": str(new.source),
            "destinations_added": [d.name for d in changes.start
                                   if d.name not in changes.replaced],
            "destinations_changed": list(changes.replaced),
            "destinations_removed": list(changes.removed),
            "needs_restart": [line.removeprefix("reload: ") for line in restart]}
        self.events.emit(Reloaded(applied=True, detail=str(new.source)))
        log.info("reload: %s applied", new.source)
        return True

    def _refused(self, why: str) -> bool:
        log.error("reload refused, the running configuration stays: %s", why)
        self.last_reload = {"applied": False, "refused": why}
        self.events.emit(Reloaded(applied=False, detail=why))
        return False

    def _apply(self, new: Config) -> None:
        assert self.processor is not None
        editor, router = rules_and_routes(new, self.engine)  # may raise: nothing changed yet
        changes = sender_changes(self.config, new)
        old = {s.destination.name: s for s in self.senders}
        started = [self._sender(dest, new) for dest in changes.start]
        self.spool.destinations = tuple(d.name for d in new.destinations)
        self.spool.create()  # out/<dest>/ of new destinations
        senders = {name: old[name] for name in changes.keep}
        senders.update({s.destination.name: s for s in started})
        self.senders = [senders[d.name] for d in new.destinations]
        # From here the next object is edited, routed and queued with the new setup.
        self.processor.setup = Setup(editor, router, {s.destination.name: s
                                                      for s in self.senders},
                                     new.process.unrouted)
        # A sender replaced or removed finishes the batch in hand (its association included)
        # before its successor reads out/<dest>/: nothing is sent twice at once.
        for name in (*changes.replaced, *changes.removed):
            old[name].stop()
            thread = self._sender_threads.pop(name, None)
            if thread is not None:
                thread.join()
        for sender in started:
            what = "changed" if sender.destination.name in old else "added"
            log.info("reload: destination %s %s", sender.destination.name, what)
            self._start_sender(sender)
        for name in changes.removed:
            left = len(self.spool.queued(name)) if self.spool.outbox(name).is_dir() else 0
            log.warning("reload: destination %s removed; %d object(s) queued for it stay in "
                        "out/%s/ (never deleted): put it back in the config to send them",
                        name, left, name)

    def _thread(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)

    def _prune_delivered_loop(self) -> None:
        """Delivered copies kept for a resend go once older than keep_delivered_hours."""
        while True:
            keep = self.config.spool.keep_delivered_hours * 3600
            try:
                gone = self.spool.prune_delivered(time.time() - keep)
            except OSError as exc:
                log.warning("delivered/: cannot prune (%s)", exc.strerror or exc)
                gone = 0
            if gone:
                log.info("delivered/: %d copy(ies) kept over %g h removed", gone,
                         self.config.spool.keep_delivered_hours)
            if self.stop_event.wait(min(600.0, max(1.0, keep / 10))):
                return

    def _watch_loop(self) -> None:
        assert self.watcher is not None
        for path in self.watcher.paths(self.stop_event):
            while not self.stop_event.is_set():
                try:
                    self._work.put(path, timeout=0.5)
                    break
                except queue.Full:
                    continue

    def _work_loop(self, processor: Processor) -> None:
        while not self.stop_event.is_set():
            try:
                path = self._work.get(timeout=0.5)
            except queue.Empty:
                continue
            if path is None:
                return
            try:
                processor.process(path)
            except OSError:
                # Logged by the processor; the object is back in incoming/. Slow down a bit
                # rather than spin on a full disk.
                self.stop_event.wait(1.0)

    def stop(self) -> None:
        """Stop accepting, finish what is in hand, leave the rest in the spool."""
        if self.receiver is not None:
            self.receiver.stop()
        for server in self.services_servers:
            server.stop()
        if self.services.commitment is not None:
            self.services.commitment.stop()
        self.stop_event.set()
        # Wake what waits for work, rather than wait out its timeout: the watcher and each
        # editing worker (a None ends its loop; a full queue means they are busy anyway).
        if self.watcher is not None:
            self.watcher.wake()
        for _ in range(self._editors):
            with contextlib.suppress(queue.Full):
                self._work.put_nowait(None)
        for sender in self.senders:
            sender.stop()
        for thread in [*self.threads, *self._sender_threads.values()]:
            thread.join(timeout=30)
        # After the editors: what they published last is committed before we return.
        if self.committer is not None and self._commit_thread is not None:
            self.committer.stop()
            self._commit_thread.join(timeout=60)
        if self.watcher is not None:
            self.watcher.close()
        if self.history is not None:
            self.history.stop()
        self.metrics.close()

    def wait(self) -> None:
        """Block until a signal asks to stop (SIGTERM/SIGINT, stop_signal) or stop_event is
        set, reloading the config when SIGHUP asked for it. A receiver that dies meanwhile is
        the supervisor's to restart and log."""
        while not self.stop_event.is_set():
            self._pause(0.2)
            if self.stop_signal is not None:
                log.info("%s: stopping (objects in hand are finished, the rest stay in the "
                         "spool)", signal.Signals(self.stop_signal).name)
                return
            for server in self.services_servers:
                server.check()
            if self.reload_requested:
                self.reload_requested = False  # before reading: a SIGHUP meanwhile reads again
                log.info("SIGHUP: reloading %s", self.config.source)
                self.reload()

    def _pause(self, seconds: float) -> None:
        """`seconds`, or less when a signal comes (its number is written to wake_fd)."""
        if select.select([self._woken], [], [], seconds)[0]:
            with contextlib.suppress(BlockingIOError):
                os.read(self._woken, 64)


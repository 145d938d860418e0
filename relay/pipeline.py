"""Wires the stages: receiver → incoming/ → watcher → editor workers → router →
out/<dest>/ → senders.

Each stage talks to the next through the spool folders (the truth, which survives a crash) and
an in-memory queue (so nothing rescans a folder per file).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from pathlib import Path

from relay import __version__
from relay.audit import NO_AUDIT, AuditLog
from relay.config import Config, ConfigError, Destination, load_config
from relay.edit import BadInput, Editor, EditOutcome
from relay.metrics import Metrics, RelayState
from relay.route import Router, Routing
from relay.send import DestinationSender
from relay.spool import PARTIAL_SUFFIX, Failure, Spool
from relay.stow import StowSender, transport_for
from relay.toolkits.base import Engine, Receiver
from relay.watch import IncomingWatcher

log = logging.getLogger("relay.pipeline")


def spool_for(config: Config) -> Spool:
    return Spool(config.spool.path, [d.name for d in config.destinations])


class Committer:
    """Makes published objects durable in groups: one syncfs for every object published
    since the last one, then their originals leave work/. Until then a crash only repeats
    their edit (duplicates at worst); senders may already be sending them meanwhile."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self._pending: list[tuple[Path, Iterable[Path]]] = []
        self._cond = threading.Condition()
        self._stopping = False

    def add(self, claimed: Path, edited: Iterable[Path]) -> None:
        with self._cond:
            self._pending.append((claimed, edited))
            self._cond.notify()

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait(1.0)
                if not self._pending:
                    return  # stopping, everything committed
                group, self._pending = self._pending, []
            try:
                self.spool.commit(group)
            except OSError as exc:
                # The originals stay in work/: the next start-up publishes them again.
                log.error("cannot make %d published object(s) durable (%s): their originals "
                          "stay in work/ until the next start", len(group), exc.strerror or exc)

    def stop(self) -> None:
        """Commit what is pending, then let run() return."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()


@dataclass(frozen=True)
class Setup:
    """What a reload replaces, swapped as one: the rules, the routes, the senders."""

    editor: Editor
    router: Router
    senders: dict[str, DestinationSender]
    unrouted: str = "keep"


class Processor:
    """Claims incoming objects, applies the rules, routes them, publishes to the queues of
    the destinations they are routed to."""

    def __init__(self, spool: Spool, editor: Editor, senders: list[DestinationSender],
                 audit: AuditLog = NO_AUDIT, committer: Committer | None = None,
                 router: Router | None = None, unrouted: str = "keep",
                 metrics: Metrics | None = None) -> None:
        self.spool = spool
        self.metrics = metrics if metrics is not None else Metrics()
        self.audit = audit
        # None: every object is made durable on its own (fsync of file and folders).
        self.committer = committer
        self.setup = Setup(editor, router or Router([s.destination for s in senders]),
                           {s.destination.name: s for s in senders}, unrouted)

    @property
    def editor(self) -> Editor:
        return self.setup.editor

    @property
    def senders(self) -> dict[str, DestinationSender]:
        return self.setup.senders

    def process(self, path: Path) -> bool:
        """Handle one incoming object; False if another worker had already claimed it."""
        claimed = self.spool.claim(path)
        if claimed is None:
            return False
        # One object, one configuration: a reload meanwhile applies from the next object.
        setup = self.setup
        stat = claimed.stat()
        edited = self.spool.edited_path(claimed)
        try:
            outcome = setup.editor.edit(claimed, edited, sync=self.committer is None)
        except BadInput as exc:
            edited.unlink(missing_ok=True)
            log.error("%s: %s: quarantined in failed/%s/", claimed.name, exc.detail, exc.reason)
            self.spool.fail(claimed, Failure(exc.reason, exc.detail, "process"))
            self.metrics.failed("", exc.reason)
            self.audit.record("failed", claimed.name, stage="process", reason=exc.reason,
                              detail=exc.detail if self.audit.patient_values else None)
            return True
        except OSError as exc:
            # Disk trouble is not the object's fault: put it back and let it be retried.
            edited.unlink(missing_ok=True)
            log.error("%s: cannot write the edited object (%s): left in incoming/",
                      claimed.name, exc.strerror or exc)
            self.spool.claim_back(claimed)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the object
            edited.unlink(missing_ok=True)
            log.exception("%s: unexpected error while editing: quarantined", claimed.name)
            detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
            self.spool.fail(claimed, Failure("internal-error", detail, "process"))
            self.metrics.failed("", "internal-error")
            self.audit.record("failed", claimed.name, stage="process", reason="internal-error")
            return True
        try:
            return self._route_and_publish(setup, claimed, edited, outcome, stat)
        except OSError as exc:
            # A full disk (the audit, a destination's copy, a link) is not the object's fault:
            # its copies go, it goes back to incoming/ to be processed again, never stuck in
            # work/ until the next start.
            log.error("%s: cannot route or queue it (%s): left in incoming/", claimed.name,
                      exc.strerror or exc)
            for leftover in self.spool.work.glob(f"{claimed.name}.edited*"):
                leftover.unlink(missing_ok=True)
            if claimed.exists():
                self.spool.claim_back(claimed)
            raise

    def _route_and_publish(self, setup: Setup, claimed: Path, edited: Path,
                           outcome: EditOutcome, stat: os.stat_result) -> bool:
        for missing in outcome.missing:
            log.warning("%s: rule not applied, source missing (on_missing = keep): %s",
                        claimed.name, missing)
        for change in outcome.changes:
            log.info("%s: %s", claimed.name, change)
        self.metrics.received(outcome.source_ae, stat.st_size)
        self.audit.record("received", claimed.name, calling_ae=outcome.source_ae,
                          size=stat.st_size, arrived=round(stat.st_mtime, 3),
                          sop_instance_uid=outcome.sop_instance_uid,
                          transfer_syntax=outcome.transfer_syntax)
        self.audit.record("edited", claimed.name, changes=self.audit.changes(outcome.changes),
                          rules_skipped=len(outcome.missing) or None)
        try:
            routing = setup.router.route(edited, outcome.source_ae)
        except (OSError, ValueError, TypeError) as exc:
            edited.unlink(missing_ok=True)
            log.error("%s: cannot read it to route it (%s): quarantined", claimed.name, exc)
            self.spool.fail(claimed, Failure("unreadable", f"routing: {exc}", "route"))
            self.metrics.failed("", "unreadable")
            self.audit.record("failed", claimed.name, stage="route", reason="unreadable")
            return True
        # Why not, with the value that decided it, unless the audit keeps no patient values
        # (then only the filter key that refused it).
        why_not = routing.not_to if self.audit.patient_values else routing.refused_by
        self.audit.record("routed", claimed.name, to=list(routing.to),
                          not_to=dict(why_not) or None)
        if not routing.to:
            return self._unrouted(claimed, edited, routing, setup.unrouted)
        durable = self.committer is None
        copies, failed = setup.router.copies(self.spool, claimed, edited, routing.to,
                                             sync=durable)
        for name, exc in failed.items():
            self._failed_for(claimed, name, exc)
        if not copies:  # every destination's own edit failed: nothing left to send
            edited.unlink(missing_ok=True)
            claimed.unlink()
            return True
        queued = self.spool.publish(claimed, copies, durable=durable)
        if self.committer is not None:
            self.committer.add(claimed, (edited, *set(copies.values())))
        else:
            edited.unlink(missing_ok=True)  # when every destination had its own edit
        for name, path_out in zip(copies, queued, strict=True):
            # The sender of the moment: one a reload put in place of the one this object's
            # setup knew finds it in out/<dest>/ anyway.
            sender = self.setup.senders.get(name)
            if sender is not None:
                sender.enqueue(path_out, received=stat.st_mtime)
            else:
                log.warning("%s: queued for %s, which a reload just removed: it stays in "
                            "out/%s/", claimed.name, name, name)
        return True

    def _unrouted(self, claimed: Path, edited: Path, routing: Routing, unrouted: str) -> bool:
        why = "; ".join(f"{d}: {w}" for d, w in routing.not_to.items()) or "no destinations"
        edited.unlink(missing_ok=True)
        if unrouted == "delete":
            log.info("%s: no destination takes it (%s): deleted ([process].unrouted = "
                     "\"delete\")", claimed.name, why)
            claimed.unlink()
            return True
        log.warning("%s: no destination takes it (%s): kept in failed/unrouted/",
                    claimed.name, why)
        self.spool.fail(claimed, Failure("unrouted", why, "route"))
        self.metrics.failed("", "unrouted")
        return True

    def _failed_for(self, claimed: Path, destination: str, exc: BadInput) -> None:
        """A destination's own edit failed: that destination gets nothing, the others go on.
        The original is kept for it (`retry` processes it again, for every destination its
        filters pick: a duplicate for the others, which PACS drop by SOP Instance UID)."""
        log.error("%s: %s's own rules failed (%s): quarantined for it in failed/%s/",
                  claimed.name, destination, exc.detail, exc.reason)
        keep = self.spool.work / f".{claimed.name}{PARTIAL_SUFFIX}"
        keep.unlink(missing_ok=True)
        os.link(claimed, keep)
        self.spool.fail(keep, Failure(exc.reason, exc.detail, "route", destination))
        self.metrics.failed(destination, exc.reason)
        self.audit.record("failed", claimed.name, stage="route", destination=destination,
                          reason=exc.reason)


class Relay:
    """The running relay: any of receive, process (edit + send), or both (`run`)."""

    # Settings a running relay cannot change: a reload reports them and keeps the old ones.
    RESTART_ONLY = ("receiver", "spool", "toolkit", "metrics", "audit")

    def __init__(self, config: Config, engine: Engine, *, receive: bool = True,
                 process: bool = True) -> None:
        self.config = config
        self.engine = engine
        self.do_receive = receive
        self.do_process = process
        self.spool = spool_for(config)
        self.stop_event = threading.Event()
        self.reload_event = threading.Event()  # set by SIGHUP; wait() reloads
        self.receiver: Receiver | None = None
        self.senders: list[DestinationSender] = []
        self._sender_threads: dict[str, threading.Thread] = {}
        self.threads: list[threading.Thread] = []
        self.watcher: IncomingWatcher | None = None
        self._work: queue.Queue[Path | None] = queue.Queue(maxsize=1000)
        self.committer: Committer | None = None
        self._commit_thread: threading.Thread | None = None
        self.metrics = Metrics()
        self.stow = StowSender()
        self.audit: AuditLog = NO_AUDIT
        self.processor: Processor | None = None

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
            self.audit = AuditLog(self.config.audit_path,
                                  patient_values=self.config.audit.patient_values)
            self.senders = [self._sender(d, self.config) for d in self.config.destinations]
            for sender in self.senders:
                self._start_sender(sender)
            self.committer = Committer(self.spool)
            self._commit_thread = threading.Thread(target=self.committer.run, name="commit",
                                                   daemon=True)
            self._commit_thread.start()
            editor, router = self._rules_and_routes(self.config)
            self.processor = Processor(self.spool, editor, self.senders, self.audit,
                                       self.committer, router, self.config.process.unrouted,
                                       self.metrics)
            for i in range(self.config.process.workers):
                self._thread(lambda p=self.processor: self._work_loop(p), f"edit-{i}")
            # Watch before the receiver starts so the first arrival is not missed.
            self.watcher = IncomingWatcher(self.spool)
            self._thread(self._watch_loop, "watch")
        if self.do_receive:
            self.receiver = self.engine.receiver(self.config, self.spool,
                                                 beside_work=self.do_process)
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

    def _rules_and_routes(self, config: Config) -> tuple[Editor, Router]:
        converter = (self.engine.toolkit_converter()
                     if config.toolkit.converter == "toolkit" else None)
        return (Editor(config.rules, converter),
                Router(config.destinations, converter, called_ae=config.receiver.ae_title))

    def _sender(self, destination: Destination, config: Config) -> DestinationSender:
        """DIMSE destinations are sent to through the engine, DICOMweb ones over HTTP."""
        return DestinationSender(self.spool, destination,
                                 transport_for(destination, self.engine, self.stow),
                                 config.sender, audit=self.audit, metrics=self.metrics)

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
            version=__version__, engine=self.engine.name)

    # --- reload (SIGHUP) -------------------------------------------------------------------

    def reload(self) -> bool:
        """Read the config file again and apply what a running relay can change, from the
        next object on: rules, destinations, filters, holds, [sender], [process].unrouted,
        log_level. What needs a restart is reported and kept as it was; a config that does
        not validate is refused and the running one stays. False when refused."""
        try:
            new = load_config(self.config.source)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            self.metrics.reloaded(False)
            return False
        if self.do_process and not new.destinations:
            log.error("reload refused, the running configuration stays: %s: no "
                      "[[destinations]] configured: nothing to forward to", new.source)
            self.metrics.reloaded(False)
            return False
        for section in (*self.RESTART_ONLY, "process"):
            old_value, new_value = getattr(self.config, section), getattr(new, section)
            if section == "process":  # unrouted applies now, workers at the next start
                new_value = replace(new_value, unrouted=old_value.unrouted)
            for item in fields(old_value):
                before, after = getattr(old_value, item.name), getattr(new_value, item.name)
                if before != after:
                    log.warning("reload: [%s].%s changed (%s -> %s): it needs a restart; "
                                "kept as it was until then", section, item.name,
                                _shown(before), _shown(after))
        new = replace(new, **{s: getattr(self.config, s) for s in self.RESTART_ONLY},
                      process=replace(self.config.process, unrouted=new.process.unrouted))
        if self.do_process:
            try:
                self._apply(new)
            except Exception as exc:  # noqa: BLE001 - a reload must never stop the relay
                log.exception("reload refused, the running configuration stays: %s", exc)
                self.metrics.reloaded(False)
                return False
        if new.log_level != self.config.log_level:
            logging.getLogger().setLevel(new.log_level)
        self.config = new
        self.metrics.reloaded(True)
        log.info("reload: %s applied", new.source)
        return True

    def _apply(self, new: Config) -> None:
        assert self.processor is not None
        editor, router = self._rules_and_routes(new)  # may raise: nothing changed yet
        old = {s.destination.name: s for s in self.senders}
        keep, start, stop = [], [], []
        for dest in new.destinations:
            sender = old.get(dest.name)
            if (sender is not None and sender.destination.definition == dest.definition
                    and new.sender == self.config.sender):
                keep.append(sender)
                continue
            start.append(self._sender(dest, new))
            if sender is not None:
                stop.append(sender)
        removed = [s for name, s in old.items() if name not in {d.name for d in new.destinations}]
        self.spool.destinations = tuple(d.name for d in new.destinations)
        self.spool.create()  # out/<dest>/ of new destinations
        senders = keep + start
        self.senders = [next(s for s in senders if s.destination.name == d.name)
                        for d in new.destinations]
        # From here the next object is edited, routed and queued with the new setup.
        self.processor.setup = Setup(editor, router, {s.destination.name: s
                                                      for s in self.senders},
                                     new.process.unrouted)
        # A sender replaced or removed finishes the batch in hand (its association included)
        # before its successor reads out/<dest>/: nothing is sent twice at once.
        for sender in stop + removed:
            sender.stop()
            thread = self._sender_threads.pop(sender.destination.name, None)
            if thread is not None:
                thread.join()
        for sender in start:
            what = "changed" if sender.destination.name in old else "added"
            log.info("reload: destination %s %s", sender.destination.name, what)
            self._start_sender(sender)
        for sender in removed:
            name = sender.destination.name
            left = len(self.spool.queued(name)) if self.spool.outbox(name).is_dir() else 0
            log.warning("reload: destination %s removed; %d object(s) queued for it stay in "
                        "out/%s/ (never deleted): put it back in the config to send them",
                        name, left, name)

    def _thread(self, target: object, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)  # type: ignore[arg-type]
        thread.start()
        self.threads.append(thread)

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
        self.stop_event.set()
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
        self.metrics.close()

    def wait(self) -> None:
        """Block until the stop event is set (by the SIGTERM/SIGINT handler), reloading the
        config when SIGHUP asked for it. A receiver that dies meanwhile is the supervisor's
        to restart and log."""
        while not self.stop_event.wait(0.2):
            if self.reload_event.is_set():
                self.reload_event.clear()
                self.reload()


def _shown(value: object) -> str:
    """A config value for a log line (paths and tuples as written)."""
    if value is None:
        return "unset"
    if hasattr(value, "__dataclass_fields__"):
        return "(changed)"
    return str(value)

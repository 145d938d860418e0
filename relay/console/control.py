"""What the console and the API do, apart from HTTP: read the queues and the quarantine from
the spool (the truth), studies from the history, and act through the running relay. Every
action is an event (Action, Requeued) with the name of who asked: the audit and the history
record it."""

from __future__ import annotations

import base64
import binascii
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from relay.edit.editor import BadInput
from relay.events import Action, Requeued
from relay.history.store import HistoryStore, StudyRow
from relay.ops.metrics import listening, open_connections, spool_figures
from relay.pipeline.processor import plan
from relay.pipeline.relay import Relay
from relay.receive.floor import floor_of, free_bytes
from relay.spool import SIDECAR_SUFFIX

MASK = "•••"
# Config keys whose values are secrets (or name a file holding one: shown all the same,
# the file is not). A URL's password is hidden too.
_SECRET_KEY = re.compile(r'^(\s*(?:password|secret|token|key_password|passphrase)\s*=\s*)(.+)$',
                         re.IGNORECASE | re.MULTILINE)
_URL_PASSWORD = re.compile(r"(://[^:/@\s\"']+:)([^@\s\"']+)(@)")


def hide_secrets(text: str) -> str:
    text = _SECRET_KEY.sub(lambda m: m.group(1) + '"(hidden)"', text)
    return _URL_PASSWORD.sub(lambda m: m.group(1) + "(hidden)" + m.group(3), text)


class NotFound(LookupError):
    pass


@dataclass
class Outcome:
    """What an action did, for its answer."""

    done: str
    details: dict[str, Any]


def failed_id(spool_failed: Path, path: Path) -> str:
    """A quarantined object's id: its path under failed/, URL-safe base64 (no padding)."""
    rel = path.relative_to(spool_failed).as_posix()
    return base64.urlsafe_b64encode(rel.encode()).decode().rstrip("=")


def failed_path(spool_failed: Path, ident: str) -> Path:
    """The object an id names; NotFound when it names nothing in failed/ (or outside it)."""
    try:
        rel = base64.urlsafe_b64decode(ident + "=" * (-len(ident) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise NotFound(f"no quarantined object {ident!r}") from None
    parts = rel.split("/")
    if len(parts) != 2 or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise NotFound(f"no quarantined object {ident!r}")
    path = spool_failed / parts[0] / parts[1]
    if parts[1].endswith(SIDECAR_SUFFIX) or not path.is_file():
        raise NotFound(f"no quarantined object {ident!r}")
    return path


class Control:
    def __init__(self, relay: Relay, store: HistoryStore | None) -> None:
        self.relay = relay
        self.store = store
        self.patient_values = relay.config.audit.patient_values

    @property
    def spool(self) -> Any:
        return self.relay.spool

    def _senders(self) -> dict[str, Any]:
        return {s.destination.name: s for s in self.relay.senders}

    # --- reading -----------------------------------------------------------------------------

    def queues(self) -> list[dict[str, Any]]:
        """Each destination's queue, read from the spool as /metrics reads it."""
        figures, _, _ = spool_figures(self.spool,
                                      [s.destination.name for s in self.relay.senders])
        queued = {q.destination: q for q in figures}
        paused = self.spool.paused()
        rows = []
        for sender in self.relay.senders:
            dest = sender.destination
            q = queued[dest.name]
            rows.append({"name": dest.name, "kind": dest.kind, "depth": q.objects,
                         "oldest_age_seconds": round(q.oldest_age, 1),
                         "paused": dest.name in paused, "held_studies": len(sender.held())})
        return rows

    def failed(self) -> list[dict[str, Any]]:
        items = []
        for path, info in self.spool.failures():
            detail = info.get("detail")
            items.append({"id": failed_id(self.spool.failed, path),
                          "reason": path.parent.name,
                          "destination": info.get("destination"),
                          "stage": info.get("stage"),
                          "object": path.name,
                          "sop_instance_uid": info.get("sop_instance_uid"),
                          "study_instance_uid": info.get("study_instance_uid"),
                          "detail": detail})
        self._identify(items)
        return items

    def _identify(self, items: list[dict[str, Any]]) -> None:
        """SOP and study UIDs of quarantined objects, from the history (as received): for
        the most recent 500 (one query each)."""
        if self.store is None:
            return
        for item in items[:500]:
            if item["sop_instance_uid"]:
                continue
            name = item["object"]
            dest = item["destination"]
            if isinstance(dest, str):
                name = name.removeprefix(f"{dest}--")
            try:
                known = self.store.object(name)
            except SQLAlchemyError:
                return  # the history does not answer: the list without its UIDs
            if known is not None:
                item["sop_instance_uid"] = known["sop_instance_uid"]
                item["study_instance_uid"] = known["study_instance_uid"]

    def studies(self, q: str, limit: int = 50) -> list[dict[str, Any]]:
        return [self._study(s) for s in self._store().search(q, limit)]

    def study(self, uid: str) -> dict[str, Any]:
        found = self._store().study(uid)
        if found is None:
            raise NotFound(f"no study {uid!r} in the history")
        study = self._study(found)
        study["events"] = [
            {"time": e["time"], "step": e["step"], "sop_instance_uid": e["sop_instance_uid"],
             "destination": e["destination"], "status": e["status"], "reason": e["reason"],
             "detail": e["detail"], "relay": e["relay"], "user": e["actor"]}
            for e in self._store().timeline(uid)]
        return study

    def objects_of(self, uid: str) -> list[dict[str, Any]]:
        return self._store().objects_of(uid)

    def login(self, name: str, address: str) -> None:
        self.relay.events.emit(Action(actor=name, action="login", target="console",
                                      detail=f"from {address}"))

    def _store(self) -> HistoryStore:
        if self.store is None:
            raise NotFound("the history is off ([history] enabled = false)")
        return self.store

    def _study(self, s: StudyRow) -> dict[str, Any]:
        def shown(value: str) -> str:
            return value if self.patient_values or not value else MASK

        return {"study_instance_uid": s.study_instance_uid,
                "patient_id": shown(s.patient_id),
                "patient_id_sent": shown(s.patient_id_sent),
                "patient_name": shown(s.patient_name),
                "accession_number": shown(s.accession_number),
                "calling_ae": s.calling_ae, "instances": s.instances,
                "first_received": s.first_received, "last_event": s.last_event,
                "destinations": s.destinations}

    # --- acting ------------------------------------------------------------------------------

    def retry(self, ident: str, actor: str) -> Outcome:
        """Requeue one quarantined object: for the destination it failed at (send stage),
        or processed again (it failed before or while routing)."""
        path = failed_path(self.spool.failed, ident)
        target = self.spool.requeue(path, self.spool.failure(path))
        to = str(target.parent.relative_to(self.spool.root))
        self.relay.events.emit(Requeued(obj=target.name, reason=path.parent.name, to=to,
                                        actor=actor))
        sender = self._senders().get(target.parent.name)
        if sender is not None and target.parent.parent == self.spool.out:
            sender.enqueue(target)
        return Outcome(f"requeued to {to}/", {"object": target.name, "to": to})

    def set_paused(self, name: str, paused: bool, actor: str) -> Outcome:
        sender = self._senders().get(name)
        if sender is None:
            raise NotFound(f"no destination {name!r}")
        sender.set_paused(paused)
        action = "pause" if paused else "resume"
        self.relay.events.emit(Action(actor=actor, action=action, target=name))
        what = "paused: its queue fills, nothing is sent" if paused else "sending again"
        return Outcome(f"{name} {what}", {"destination": name, "paused": paused})

    def release(self, uid: str, actor: str) -> Outcome:
        """Send a held study now, at every destination holding it (a destination whose own
        rules changed the StudyInstanceUID holds it under the new one: found through the
        history's objects)."""
        objs = self.store.objects_named(uid) if self.store is not None else set()
        released: dict[str, int] = {}
        for name, sender in self._senders().items():
            for held_uid, _count, _quiet in sender.held():
                paths = sender.held_paths(held_uid)
                if held_uid == uid or any(p.name in objs for p in paths):
                    count = sender.release_now(held_uid)
                    if count:
                        released[name] = released.get(name, 0) + count
        if not released:
            raise NotFound(f"study {uid!r} is held at no destination")
        self.relay.events.emit(Action(actor=actor, action="release", target=uid,
                                      detail=", ".join(f"{d}: {n} object(s)"
                                                       for d, n in released.items())))
        return Outcome("released", {"study_instance_uid": uid, "objects": released})

    def kept_copies(self, uid: str) -> dict[str, list[str]]:
        """Destination -> the names of a study's delivered copies still kept for a resend
        ([spool] keep_delivered_hours)."""
        if not self.spool.keep_delivered or self.store is None:
            return {}
        names = self.store.objects_named(uid)
        kept: dict[str, list[str]] = {}
        for sender in self.relay.senders:
            dest = sender.destination.name
            found = [n for n in sorted(names) if self.spool.kept_copy(dest, n) is not None]
            if found:
                kept[dest] = found
        return kept

    def resend(self, uid: str, destination: str, actor: str) -> Outcome:
        """Send a study's delivered copies to a destination again."""
        sender = self._senders().get(destination)
        if sender is None:
            raise NotFound(f"no destination {destination!r}")
        names = self.kept_copies(uid).get(destination, [])
        if not names:
            raise NotFound(f"no delivered copy of study {uid!r} kept for {destination} "
                           "([spool] keep_delivered_hours)")
        for name in names:
            target = self.spool.resend(destination, name)
            self.relay.events.emit(Requeued(obj=name, reason="delivered",
                                            to=f"out/{destination}", actor=actor))
            sender.enqueue(target)
        return Outcome(f"{len(names)} object(s) queued again for {destination}",
                       {"study_instance_uid": uid, "destination": destination,
                        "objects": len(names)})

    def retry_many(self, idents: list[str], actor: str) -> int:
        done = 0
        for ident in idents:
            try:
                self.retry(ident, actor)
            except (NotFound, FileNotFoundError):
                continue  # gone meanwhile (retried or deleted by someone else)
            done += 1
        return done

    def retry_study(self, uid: str, actor: str) -> Outcome:
        """Requeue a study's quarantined objects, each for the destination it failed at."""
        ids = [item["id"] for item in self.failed() if item["study_instance_uid"] == uid]
        if not ids:
            raise NotFound(f"no quarantined object of study {uid!r}")
        count = self.retry_many(ids, actor)
        return Outcome(f"{count} object(s) requeued", {"study_instance_uid": uid,
                                                      "objects": count})

    def ids_of_reason(self, reason: str) -> list[str]:
        # From the spool alone: the history's UIDs (failed()) are not needed to pick them.
        return [failed_id(self.spool.failed, path) for path, _ in self.spool.failures()
                if path.parent.name == reason]

    def delete_failed(self, idents: list[str], actor: str) -> int:
        """Delete quarantined objects (and their sidecars) for good: on record with the
        count and the objects' names."""
        gone = []
        for ident in idents:
            try:
                path = failed_path(self.spool.failed, ident)
            except NotFound:
                continue
            path.unlink(missing_ok=True)
            path.with_name(path.name + SIDECAR_SUFFIX).unlink(missing_ok=True)
            gone.append(f"{path.parent.name}/{path.name}")
        if gone:
            self.relay.events.emit(Action(actor=actor, action="delete", target="failed/",
                                          detail=f"{len(gone)} object(s): "
                                          + ", ".join(gone[:50])
                                          + (" …" if len(gone) > 50 else "")))
        return len(gone)

    def echo(self, name: str, actor: str) -> tuple[bool, str]:
        """C-ECHO (or a QIDO-RS query for DICOMweb) to a destination, as `dicom-relay echo`."""
        sender = self._senders().get(name)
        if sender is None:
            raise NotFound(f"no destination {name!r}")
        cfg = self.relay.config
        try:
            sender.transport.echo(sender.destination, cfg.sender.calling_ae_title,
                                  min(cfg.sender.timeout, 15.0))
        except Exception as exc:  # noqa: BLE001 - any failure is the answer
            return False, str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        return True, f"{sender.destination.describe()} answered"

    def overview(self) -> dict[str, Any]:
        cfg = self.relay.config
        now = time.time()
        queues, folders, quarantined = spool_figures(self.spool,
                                                     [d.name for d in cfg.destinations], now)
        depth = {q.destination: q for q in queues}
        paused = self.spool.paused()
        delivered: dict[str, int] = {}
        chart: list[tuple[float, int]] = []
        history_error = None
        if self.store is not None:
            try:
                delivered = self.store.delivered_per_destination(now - 3600)
                chart = self.store.throughput(now - 6 * 3600, 600)
            except SQLAlchemyError as exc:
                history_error = str(exc).splitlines()[0][:200]
        destinations = []
        for sender in self.relay.senders:
            dest = sender.destination
            q = depth.get(dest.name)
            last_error = None
            if self.store is not None and history_error is None:
                try:
                    last_error = self.store.last_error(dest.name)
                except SQLAlchemyError:
                    last_error = None
            destinations.append({
                "name": dest.name, "kind": dest.kind, "where": dest.describe(),
                "state": ("paused" if dest.name in paused else "down" if sender.down
                          else "up"),
                "depth": q.objects if q else 0,
                "oldest_age_seconds": q.oldest_age if q else 0.0,
                "delivered_last_hour": delivered.get(dest.name, 0),
                "held_studies": len(sender.held()),
                "last_error": last_error})
        floor = floor_of(cfg)
        free = free_bytes(cfg.spool.path)
        port = cfg.receiver.port
        return {
            # Listening on its port, whichever process receives (a child, storescp, or a
            # `receive` beside this `process`).
            "receiver_up": listening(port),
            "receiver_port": port,
            "associations": open_connections(port),
            "free_bytes": free, "floor_bytes": floor.bytes,
            "low_space": free < 2 * floor.bytes,
            "destinations": destinations, "folders": folders, "quarantined": quarantined,
            "chart": chart, "history_error": history_error, "now": now,
            "engine": self.relay.engine.describe(), "relay": cfg.relay_name}

    def tester(self, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """The dry run of the running rules and routes on uploaded files: per file, the
        changes, the destinations (and why not the others), each destination's own
        changes. Nothing is stored: the files live in a temporary folder for the call."""
        setup = self.relay.processor.setup if self.relay.processor is not None else None
        if setup is None:
            raise NotFound("this process does not edit (a `receive` process)")
        results = []
        for name, data in files:
            with tempfile.TemporaryDirectory(prefix="dicom-relay-tester-") as tmp:
                source = Path(tmp) / "original.dcm"
                source.write_bytes(data)
                edited = Path(tmp) / "edited.dcm"
                entry: dict[str, Any] = {"file": name, "changes": [], "missing": [],
                                         "to": [], "not_to": {}, "error": None}
                try:
                    plan_ = plan(setup.editor, setup.router, source, edited,
                                 lambda _n, _i: None, sync=False)
                except BadInput as exc:
                    entry["error"] = f"{exc.reason}: {exc.detail}"
                    results.append(entry)
                    continue
                entry["changes"] = [str(c) for c in plan_.outcome.changes]
                entry["missing"] = list(plan_.outcome.missing)
                if plan_.routing is None:
                    entry["error"] = plan_.route_error
                else:
                    entry["to"] = [
                        {"name": d,
                         "changes": [str(c) for c in plan_.copies.changes.get(d, [])],
                         "failed": (f"{plan_.copies.failed[d].reason}: "
                                    f"{plan_.copies.failed[d].detail}"
                                    if d in plan_.copies.failed else None)}
                        for d in plan_.routing.to]
                    entry["not_to"] = dict(plan_.routing.not_to)
                results.append(entry)
        return results

    def config_text(self) -> str:
        """The running config file with its secrets hidden (passwords, tokens, keys)."""
        try:
            text = Path(self.relay.config.source).read_text(encoding="utf-8")
        except OSError as exc:
            return f"(cannot read {self.relay.config.source}: {exc.strerror})"
        return hide_secrets(text)

    def reload(self, actor: str) -> tuple[bool, dict[str, Any]]:
        applied = self.relay.reload()
        report = dict(self.relay.last_reload)
        self.relay.events.emit(Action(actor=actor, action="reload",
                                      target=str(self.relay.config.source),
                                      detail="applied" if applied
                                      else f"refused: {report.get('refused', '')}"))
        return applied, report

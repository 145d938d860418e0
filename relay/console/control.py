"""What the console and the API do, apart from HTTP: read the queues and the quarantine from
the spool (the truth), studies from the history, and act through the running relay. Every
action is an event (Action, Requeued) with the name of who asked: the audit and the history
record it."""

from __future__ import annotations

import base64
import binascii
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relay.events import Action, Requeued
from relay.history.store import HistoryStore, StudyRow
from relay.pipeline.relay import Relay
from relay.spool import SIDECAR_SUFFIX

MASK = "•••"


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
        now = time.time()
        rows = []
        paused = self.spool.paused()
        for sender in self.relay.senders:
            dest = sender.destination
            queued = self.spool.queued(dest.name)
            oldest = 0.0
            if queued:
                try:
                    oldest = max(0.0, now - queued[0].stat().st_mtime)
                except FileNotFoundError:
                    oldest = 0.0
            rows.append({"name": dest.name, "kind": dest.kind, "depth": len(queued),
                         "oldest_age_seconds": round(oldest, 1),
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
        """SOP and study UIDs of quarantined objects, from the history (as received)."""
        if self.store is None:
            return
        for item in items:
            if item["sop_instance_uid"]:
                continue
            name = item["object"]
            dest = item["destination"]
            if isinstance(dest, str):
                name = name.removeprefix(f"{dest}--")
            known = self.store.object(name)
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
        info = dict(next((i for p, i in self.spool.failures() if p == path), {}))
        target = self.spool.requeue(path, info)
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

    def reload(self, actor: str) -> tuple[bool, dict[str, Any]]:
        applied = self.relay.reload()
        report = dict(self.relay.last_reload)
        self.relay.events.emit(Action(actor=actor, action="reload",
                                      target=str(self.relay.config.source),
                                      detail="applied" if applied
                                      else f"refused: {report.get('refused', '')}"))
        return applied, report

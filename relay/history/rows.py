"""What the history keeps of each event: a pure translation of an event into operations on
the tables (plain JSON-able tuples, so a batch the database could not take waits in a file).

    ("event", {...})           a line of the object's timeline
    ("object", {...})          an object received: its identity as received, its study
    ("object_state", {...})    failed before routing, unrouted, deleted
    ("sent_patient_id", {...}) the PatientID the global rules gave it
    ("delivery", {...})        its state at one destination
"""

from __future__ import annotations

from typing import Any

from relay.events import (
    Action,
    Change,
    CommitmentDeferred,
    CommitmentEvent,
    CommitmentReported,
    Deferred,
    Delivered,
    Edited,
    Event,
    Failed,
    Held,
    Queried,
    Queued,
    Received,
    Released,
    Requeued,
    Retrieved,
    Routed,
    ServiceEvent,
    Transcoded,
    Unrouted,
)

Op = tuple[str, dict[str, Any]]


def _event(e: Event, step: str, obj: str, **fields: Any) -> Op:
    row = {"time": e.time, "step": step, "obj": obj, "destination": None, "status": None,
           "reason": None, "detail": None, "actor": None}
    row.update(fields)
    return ("event", row)


def _changes(changes: tuple[Change, ...], patient_values: bool) -> str:
    if patient_values:
        return "; ".join(str(c) for c in changes)
    return "; ".join(c.attribute for c in changes)


def ops_of(e: Event, patient_values: bool = True) -> list[Op]:
    """The operations one event makes (none for events that concern no object)."""
    if isinstance(e, Received):
        i = e.identity
        return [("object", {"obj": e.obj, "time": e.time, "received": e.arrived,
                            "sop_instance_uid": i.sop_instance_uid,
                            "sop_class_uid": i.sop_class_uid,
                            "series_instance_uid": i.series_instance_uid,
                            "study_instance_uid": i.study_instance_uid,
                            "modality": i.modality, "calling_ae": e.calling_ae,
                            "size": e.size, "patient_id": i.patient_id,
                            "patient_name": i.patient_name,
                            "accession_number": i.accession_number}),
                _event(e, "received", e.obj, detail=f"from {e.calling_ae or '(unknown AE)'}, "
                       f"{e.size} bytes, {e.transfer_syntax}")]
    if isinstance(e, Edited):
        ops = [_event(e, "edited", e.obj, destination=e.destination,
                      detail=_changes(e.changes, patient_values) or "no change")]
        if e.destination is None:
            for c in e.changes:
                if c.attribute == "PatientID":
                    ops.append(("sent_patient_id", {"obj": e.obj, "patient_id": c.after or ""}))
        return ops
    if isinstance(e, Routed):
        why = e.not_to if patient_values else e.refused_by
        detail = "to " + (", ".join(e.to) or "nowhere")
        if why:
            detail += "; not to " + "; ".join(f"{d} ({w})" for d, w in why.items())
        return [_event(e, "routed", e.obj, detail=detail)]
    if isinstance(e, Unrouted):
        state = "unrouted" if e.kept else "deleted"
        return [("object_state", {"obj": e.obj, "state": state, "time": e.time}),
                _event(e, "unrouted", e.obj, reason="unrouted",
                       detail=(e.why if patient_values else e.why_keys)
                       + ("" if e.kept else " (deleted: [process].unrouted)"))]
    if isinstance(e, Failed):
        shown = e.detail if (patient_values or not e.sensitive) else None
        ops = [_event(e, "failed", e.obj, destination=e.destination, status=e.status,
                      reason=e.reason, detail=shown)]
        if e.destination is None:
            ops.insert(0, ("object_state", {"obj": e.obj, "state": "failed", "time": e.time}))
        else:
            ops.insert(0, ("delivery", {"obj": e.obj, "destination": e.destination,
                                        "state": "failed", "status": e.status,
                                        "time": e.time}))
        return ops
    if isinstance(e, Queued):
        return [("delivery", {"obj": e.obj, "destination": e.destination, "state": "queued",
                              "status": None, "time": e.time}),
                _event(e, "queued", e.obj, destination=e.destination)]
    if isinstance(e, Held):
        return [("delivery", {"obj": e.obj, "destination": e.destination, "state": "held",
                              "status": None, "time": e.time}),
                _event(e, "held", e.obj, destination=e.destination,
                       detail="until its study is complete")]
    if isinstance(e, Released):
        ops = []
        for obj in e.objects:
            ops.append(("delivery", {"obj": obj, "destination": e.destination,
                                     "state": "queued", "status": None, "time": e.time}))
            ops.append(_event(e, "released", obj, destination=e.destination,
                              detail=f"study quiet for {e.quiet_for:.1f} s"))
        return ops
    if isinstance(e, Transcoded):
        return [_event(e, "transcoded", e.obj, destination=e.destination,
                       detail=f"{e.transfer_syntax} -> {e.to}: {e.because}")]
    if isinstance(e, Delivered):
        return [("delivery", {"obj": e.obj, "destination": e.destination,
                              "state": "delivered", "status": e.status, "time": e.time}),
                _event(e, "delivered", e.obj, destination=e.destination, status=e.status)]
    if isinstance(e, Deferred):
        return [_event(e, "deferred", e.obj, destination=e.destination, status=e.status,
                       reason=e.reason, detail=f"{e.detail} (again in {e.retry_in:.0f} s)")]
    if isinstance(e, Requeued):
        ops = [_event(e, "requeued", e.obj, reason=e.reason, detail=f"to {e.to}",
                      actor=e.actor)]
        if e.to.startswith("out/"):
            ops.insert(0, ("delivery", {"obj": e.obj, "destination": e.to[4:],
                                        "state": "queued", "status": None, "time": e.time}))
        return ops
    if isinstance(e, Action):
        return [_event(e, "action", e.target, reason=e.action, detail=e.detail or None,
                       actor=e.actor)]
    if isinstance(e, ServiceEvent):
        return [_service(e, patient_values)]
    if isinstance(e, CommitmentEvent):
        return [_commitment(e)]
    return []


def _commitment(e: CommitmentEvent) -> Op:
    """A storage commitment transaction's step (obj: its Transaction UID; actor: the
    modality that asked)."""
    if isinstance(e, CommitmentReported):
        what = (f"{e.instances} instance(s): {e.committed} committed, {e.failed} failed, "
                f"reported on {e.via}")
        if e.failures:
            what += "; failed: " + "; ".join(e.failures[:20])
        return _event(e, "commitment-reported", e.transaction, actor=e.requester,
                      reason=e.host, status="some failed" if e.failed else "committed", detail=what)
    if isinstance(e, CommitmentDeferred):
        return _event(e, "commitment-deferred", e.transaction, actor=e.requester,
                      reason=e.host, detail=f"{e.detail} (again in {e.retry_in:.0f} s)")
    return _event(e, "commitment-requested", e.transaction, actor=e.requester, reason=e.host,
                  detail=f"{e.instances} instance(s)")


def _service(e: ServiceEvent, patient_values: bool) -> Op:
    """A query or a retrieve: a line of its own (obj: the requester; actor: the same),
    saying what was asked and what came of it."""
    keys = e.keys if patient_values else e.key_names
    if isinstance(e, Retrieved):
        step = "retrieve"
        to = f" to {e.move_destination}" if e.move_destination else ""
        what = (f"{e.operation}{to} {e.level}: {keys}: {e.completed} completed, "
                f"{e.failed} failed, {e.warning} warning")
    else:
        step = "query"
        matches = e.matches if isinstance(e, Queried) else 0
        what = f"C-FIND {e.level}: {keys}: {matches} match(es)"
    if e.detail:
        what += f" ({e.detail})"
    return _event(e, step, e.requester, status=e.status, detail=what, actor=e.requester,
                  reason=e.host)


def ops_of_audit_line(line: dict[str, Any], time: float) -> list[Op]:
    """An audit.jsonl line as history operations (`dicom-relay history import`). The audit
    log names objects and SOP Instance UIDs, not studies: imported objects are found by
    their SOP Instance UID and object name, and join a study only if the history already
    knows their object."""
    step = str(line.get("step", ""))
    obj = str(line.get("object", ""))
    dest = line.get("destination")
    if not step or not obj:
        return []
    ops: list[Op] = []
    detail: str | None
    if step == "received":
        ops.append(("object", {"obj": obj, "time": time, "received": line.get("arrived", time),
                               "sop_instance_uid": line.get("sop_instance_uid", ""),
                               "sop_class_uid": "", "series_instance_uid": "",
                               "study_instance_uid": "", "modality": "",
                               "calling_ae": line.get("calling_ae"),
                               "size": line.get("size"), "patient_id": "",
                               "patient_name": "", "accession_number": ""}))
        detail = f"from {line.get('calling_ae') or '(unknown AE)'}, {line.get('size')} bytes"
    elif step == "edited":
        changes = line.get("changes") or []
        detail = "; ".join(str(Change(c.get("attribute", "?"), c.get("before"), c.get("after")))
                           if "before" in c else str(c.get("attribute", "?"))
                           for c in changes) or "no change"
    elif step == "routed":
        detail = "to " + (", ".join(line.get("to") or []) or "nowhere")
        if line.get("not_to"):
            detail += "; not to " + "; ".join(f"{d} ({w})" for d, w in line["not_to"].items())
    else:
        detail = None if line.get("detail") is None else str(line["detail"])
    if step in ("queued", "delivered", "failed", "held", "released", "requeued") and dest:
        state = {"released": "queued", "requeued": "queued"}.get(step, step)
        ops.append(("delivery", {"obj": obj, "destination": dest, "state": state,
                                 "status": line.get("status"), "time": time}))
    elif step == "failed":
        ops.append(("object_state", {"obj": obj, "state": "failed", "time": time}))
    ops.append(("event", {"time": time, "step": step, "obj": obj, "destination": dest,
                          "status": line.get("status"), "reason": line.get("reason"),
                          "detail": None if detail is None else str(detail),
                          "actor": line.get("user")}))
    return ops

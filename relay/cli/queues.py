"""The spool seen from outside: `status` (queues, failures, the running relay's counters)
and `retry` (quarantined objects back in the queue)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from relay.cli.common import DEFAULT_CONFIG, ConfigOpt, example, load
from relay.config.model import join_host_port
from relay.receive.floor import floor_of

if TYPE_CHECKING:  # the pipeline is imported by the verbs that use it (relay.cli.common)
    from relay.config.model import Config
    from relay.ops.metrics import Samples
    from relay.services.ledger import Ledger


def status(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    failures: Annotated[int, typer.Option(help="How many recent failures to list.")] = 10,
) -> None:
    """Queue depth and oldest object per destination, spool folders, held studies, the most
    recent failures, and, when the relay serves [metrics], its counters since it started.

    The figures are those of /metrics (Prometheus): the queues read from the spool, the
    counters from the running relay.
    """
    from relay.ops import metrics
    from relay.pipeline.relay import spool_for
    from relay.send.hold import held_studies
    from relay.services.ledger import LEDGER, Ledger

    cfg = load(config)
    spool = spool_for(cfg)
    if not spool.root.is_dir():
        typer.echo(f"spool {spool.root} does not exist yet (the relay has not run)")
        return
    queues, folders, _ = metrics.spool_figures(spool, [d.name for d in cfg.destinations])
    samples = _running_samples(cfg)
    counters = metrics.counters(samples)
    typer.echo(f"spool {spool.root}: " + ", ".join(f"{k} {v}" for k, v in folders.items()))
    floor = floor_of(cfg)
    below = "" if floor.room_for(0) else ": BELOW THE FLOOR, the receiver takes no new object"
    typer.echo(f"spool disk: {floor.describe()}{below}")
    kinds = {d.name: "DICOMweb" if d.kind == "dicomweb" else "DIMSE" for d in cfg.destinations}
    typer.echo(f"\n{'destination':<20} {'kind':<8} {'queued':>7} {'oldest':>8}"
               + (f" {'delivered':>10} {'retried':>8} {'failed':>7}" if counters else ""))
    for q in queues:
        line = (f"{q.destination:<20} {kinds.get(q.destination, '-'):<8} {q.objects:>7} "
                f"{_age(q.oldest_age):>8}")
        if counters:
            line += "".join(f" {counters.get((name, q.destination), 0):>{width}.0f}"
                            for name, width in (("delivered", 10), ("retried", 8),
                                                ("failed", 7)))
        if not q.configured:
            line += "  (no longer in the config: kept in the spool, never deleted)"
        if spool.is_paused(q.destination):
            line += "  PAUSED (nothing is sent until it is resumed: console, API)"
        typer.echo(line)
    for name, codes in sorted(metrics.http_statuses(samples).items()):
        typer.echo(f"{name}: HTTP statuses since the relay started: "
                   + ", ".join(f"{code} x{count:.0f}" for code, count in sorted(codes.items())))
    if counters:
        received = {k[1]: v for k, v in counters.items() if k[0] == "received"}
        typer.echo("\nreceived since the relay started: " + (", ".join(
            f"{ae or '(no AE)'} {count:.0f}" for ae, count in sorted(received.items()))
            or "nothing"))
    elif cfg.metrics.listen is None:
        typer.echo("\n(counters: set [metrics].listen to have the running relay count "
                   "deliveries, retries and failures)")
    else:
        typer.echo(f"\n(counters: no relay answers at {join_host_port(*cfg.metrics.listen)})")
    now = time.time()
    for dest in cfg.destinations:
        if dest.hold_until_stable <= 0:
            continue
        studies = held_studies(spool.queued(dest.name))
        typer.echo(f"\nheld for {dest.name} (until quiet {dest.hold_until_stable:g} s, at "
                   f"most {dest.hold_max:g} s): {len(studies)} stud"
                   + ("y" if len(studies) == 1 else "ies"))
        for study in studies:
            typer.echo(f"  {study.uid}: {len(study.paths)} object(s), first {now - study.first:.0f}"
                       f" s ago, last {now - study.last:.0f} s ago")
    if cfg.commitment is not None and (spool.root / LEDGER).exists():
        _commitment_status(Ledger(spool.root), now)
    recent = list(spool.failures())
    if recent:
        typer.echo(f"\nrecent failures ({min(failures, len(recent))} of {len(recent)}):")
    for path, info in recent[:failures]:
        where = f" -> {info['destination']}" if info.get("destination") else ""
        typer.echo(f"  {info.get('when', '?')} {info.get('reason', '?')}{where}: "
                   f"{path.name}: {info.get('detail', '')}")


def _commitment_status(ledger: Ledger, now: float) -> None:
    """Storage commitment: the transactions not reported yet, and what was reported."""
    pending, committed, failed = ledger.figures()
    typer.echo(f"\nstorage commitment: {pending} transaction(s) waiting for their report; "
               f"{committed} instance(s) reported committed, {failed} failed so far")
    for tx in ledger.transactions():
        line = (f"  {tx.uid} from {tx.requester} ({tx.host}): {len(tx.instances)} "
                f"instance(s), asked {_age(now - tx.created)} ago, due in "
                f"{_age(tx.deadline - now)}")
        if tx.last_error:
            line += f"; report not delivered ({tx.attempts} tries): {tx.last_error}"
        typer.echo(line)
    ledger.close()


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _running_samples(cfg: Config) -> Samples:
    """The running relay's /metrics; {} when it serves none (or none answers)."""
    from relay.ops import metrics

    if cfg.metrics.listen is None:
        return {}
    try:
        return metrics.scrape(cfg.metrics.listen)
    except (OSError, ValueError):
        return {}


def retry(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    reason: Annotated[str | None, typer.Option(
        help="Only objects quarantined for this reason (a failed/ sub-folder name).")] = None,
) -> None:
    """Put quarantined objects (failed/) back in the queue.

    Objects that failed at a destination go back to that destination's queue; objects that
    failed processing go back to incoming/ and are processed again by a running relay.
    """
    from relay.events import EventBus, Requeued
    from relay.ops.audit import AuditLog
    from relay.pipeline.relay import spool_for

    cfg = load(config)
    spool = spool_for(cfg)
    spool.create()
    # Every action is on record: the audit log gets a line per object requeued.
    events = EventBus()
    events.subscribe(AuditLog(cfg.audit_path, patient_values=cfg.audit.patient_values))
    count = 0
    for path, info in spool.failures():
        if reason is not None and path.parent.name != reason:
            continue
        target = spool.requeue(path, info)
        events.emit(Requeued(obj=target.name, reason=path.parent.name,
                             to=str(target.parent.relative_to(spool.root))))
        typer.echo(f"requeued {path.parent.name}/{path.name} -> {target.parent.name}/")
        count += 1
    typer.echo(f"{count} object(s) requeued")


def register(app: typer.Typer) -> None:
    app.command(epilog=example("dicom-relay status --config relay.toml"))(status)
    app.command(epilog=example("dicom-relay retry --config relay.toml --reason status-A900"))(retry)

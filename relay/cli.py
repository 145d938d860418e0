"""`dicom-relay`: the command line. The verbs below and nothing else; the work is elsewhere."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from relay import __version__
from relay.config import Config, ConfigError, Destination, join_host_port, load_config
from relay.edit import BadInput, Editor
from relay.hold import held_studies
from relay.metrics import scrape, spool_figures
from relay.pipeline import Relay, spool_for
from relay.route import Router
from relay.stow import transport_for
from relay.supervisor import LOG_PLAIN_ENV
from relay.toolkits import select_engine
from relay.toolkits.base import DestinationUnavailable, Engine, Outcome, ToolFailure

app = typer.Typer(
    name="dicom-relay",
    help="A DICOM relay (PACS proxy): receive studies by C-STORE, rewrite their metadata with "
    "rules, forward them to one or more PACS, delete them only once each PACS confirmed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
log = logging.getLogger("relay")

DEFAULT_CONFIG = "/etc/dicom-relay/relay.toml"
ConfigOpt = Annotated[Path, typer.Option(
    "--config", "-c", envvar="DICOM_RELAY_CONFIG",
    help="The relay's TOML config file (env DICOM_RELAY_CONFIG).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")]


def _setup_logging(level: str, verbose: bool = False) -> None:
    plain = os.environ.get(LOG_PLAIN_ENV) == "1"  # a supervised child: its parent stamps
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, level, logging.INFO),
        format=("" if plain else "%(asctime)s ") + "%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    # pynetdicom narrates every PDU at INFO and repeats as ERROR what our own log lines say
    # with more context (which destination, what happens next); all of it with --verbose.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.CRITICAL)


def _load(config: Path, verbose: bool = False) -> Config:
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    _setup_logging(cfg.log_level, verbose)
    return cfg


def _engine(cfg: Config) -> Engine:
    try:
        return select_engine(cfg)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None


def _serve(cfg: Config, *, receive: bool, process: bool) -> None:
    engine = _engine(cfg)
    relay = Relay(cfg, engine, receive=receive, process=process)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: stopping (objects in hand are finished, the rest stay in the spool)",
                 signal.Signals(signum).name)
        relay.stop_event.set()

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        log.info("SIGHUP: reloading %s", cfg.source)
        relay.reload_event.set()  # the main loop reloads: no work inside a signal handler

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_hangup)
    try:
        relay.start()
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(1) from None
    parts = [p for p, on in (("receive", receive), ("process+send", process)) if on]
    log.info("dicom-relay %s running (%s) on the %s engine, spool %s", __version__,
             " + ".join(parts), engine.describe(), cfg.spool.path)
    relay.wait()
    relay.stop()
    log.info("stopped")


@app.command(epilog="Example: `dicom-relay run --config /etc/dicom-relay/relay.toml`")
def run(config: ConfigOpt = Path(DEFAULT_CONFIG), verbose: VerboseOpt = False) -> None:
    """Receive, rewrite and forward, in the foreground (for systemd or Docker).

    Stops cleanly on SIGTERM or Ctrl-C; whatever is not yet delivered stays in the spool and is
    sent after the next start. SIGHUP (`systemctl reload dicom-relay`) re-reads the config:
    rules, destinations, filters and [sender] apply from the next object, without dropping an
    association; receiver, spool, toolkit, metrics and audit settings need a restart (the log
    says so); a config that does not validate is refused and the running one stays.
    """
    _serve(_load(config, verbose), receive=True, process=True)


@app.command(epilog="Example: `dicom-relay receive --config relay.toml`")
def receive(config: ConfigOpt = Path(DEFAULT_CONFIG), verbose: VerboseOpt = False) -> None:
    """Only receive: a C-STORE SCP writing complete objects into spool/incoming/.

    Pair it with `dicom-relay process` (two services, as the original relay_init/relay_process).
    """
    _serve(_load(config, verbose), receive=True, process=False)


@app.command(epilog="Example: `dicom-relay process --config relay.toml`")
def process(config: ConfigOpt = Path(DEFAULT_CONFIG), verbose: VerboseOpt = False) -> None:
    """Only process: watch spool/incoming/, apply the rules, forward, delete once delivered."""
    _serve(_load(config, verbose), receive=False, process=True)


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            typer.echo(f"error: {path}: no such file or folder", err=True)
            raise typer.Exit(2)
    return files


@app.command(epilog="Example: `dicom-relay send --config relay.toml central /data/study1/`")
def send(
    destination: Annotated[str, typer.Argument(help="A [[destinations]] name from the config.")],
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    verbose: VerboseOpt = False,
) -> None:
    """Send files as they are (no rules, nothing deleted) to a destination, with a progress bar.

    Exits 1 if any file was not stored, listing each with the destination's status.
    """
    cfg = _load(config, verbose)
    try:
        dest = cfg.destination(destination)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    files = _expand(paths)
    engine = _engine(cfg)
    problems = []
    stored = 0
    started = time.monotonic()
    with typer.progressbar(length=len(files), label=f"sending to {dest.name}",
                           file=sys.stderr) as bar:
        sender = transport_for(dest, engine)
        for result in sender.send(files, dest, cfg.sender.calling_ae_title, cfg.sender.timeout):
            bar.update(1)
            if result.outcome is Outcome.DELIVERED:
                stored += 1
            else:
                problems.append(result)
    elapsed = time.monotonic() - started
    for r in problems:
        typer.echo(f"NOT STORED {r.path}: {r.status_text} {r.detail}", err=True)
    rate = stored / elapsed if elapsed > 0 else 0.0
    typer.echo(f"{stored}/{len(files)} stored at {dest.name} in {elapsed:.1f} s ({rate:.1f}/s)")
    if problems:
        raise typer.Exit(1)


@app.command(epilog="Example: `dicom-relay echo --config relay.toml central`")
def echo(
    destination: Annotated[str | None, typer.Argument(
        help="A destination name; all destinations when left out.")] = None,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    receiver: Annotated[bool, typer.Option(
        "--receiver", help="C-ECHO this relay's own receiver instead (a health check).")]
    = False,
    verbose: VerboseOpt = False,
) -> None:
    """C-ECHO destinations (DICOM ping); a DICOMweb destination gets a QIDO-RS query for one
    study (it answers, and takes our credentials). Exits 1 if any does not answer."""
    cfg = _load(config, verbose)
    if receiver:
        from relay.toolkits.embedded import EmbeddedEngine

        rc = cfg.receiver
        host = "127.0.0.1" if rc.host in ("0.0.0.0", "") else rc.host  # noqa: S104
        own = Destination("receiver", rc.ae_title, host, rc.port)
        try:  # pynetdicom whatever the engine: no JVM start for a health check
            EmbeddedEngine().echo(own, cfg.sender.calling_ae_title, 10.0)
        except (DestinationUnavailable, ToolFailure) as exc:
            typer.echo(f"FAIL {exc}")
            raise typer.Exit(1) from None
        typer.echo(f"ok   receiver {rc.ae_title}@{host}:{rc.port}")
        return
    if not _echo_all(cfg, destination):
        raise typer.Exit(1)


def _echo_all(cfg: Config, only: str | None = None) -> bool:
    engine = _engine(cfg)
    try:
        dests = [cfg.destination(only)] if only else list(cfg.destinations)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not dests:
        typer.echo("no [[destinations]] configured")
        return False
    ok = True
    for dest in dests:
        started = time.monotonic()
        try:
            transport_for(dest, engine).echo(dest, cfg.sender.calling_ae_title,
                                             min(cfg.sender.timeout, 10.0))
        except (DestinationUnavailable, ToolFailure) as exc:
            typer.echo(f"FAIL {dest.name}: {exc}")
            ok = False
            continue
        ms = (time.monotonic() - started) * 1000
        what = "QIDO-RS" if dest.kind == "dicomweb" else "C-ECHO"
        typer.echo(f"ok   {dest.name} ({dest.describe()}, {what}) {ms:.0f} ms")
    return ok


@app.command(epilog="Example: `dicom-relay edit --config relay.toml --dry-run study/*.dcm`")
def edit(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", "-n", help="Show, per file, each attribute before -> after, the "
        "destinations it would go to (and for the others which filter key failed) and each "
        "destination's own changes; write nothing.")]
    = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder for the edited copies (originals are never changed); "
        "destinations with rules of their own get theirs in DIR/<destination>/.")]
    = None,
    calling_ae: Annotated[str | None, typer.Option(
        "--calling-ae", help="Route as if sent by this AE title (default: the one the file "
        "records, (0002,0016)).")] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Apply the configured rules and routes to files: to try them before production."""
    cfg = _load(config, verbose)
    if not dry_run and output is None:
        typer.echo("error: give --dry-run to see the changes, or --output DIR to write edited "
                   "copies", err=True)
        raise typer.Exit(2)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    converter = _engine(cfg).toolkit_converter() if cfg.toolkit.converter == "toolkit" else None
    editor = Editor(cfg.rules, converter)
    router = Router(cfg.destinations, converter, called_ae=cfg.receiver.ae_title)
    bad = 0
    for path in _expand(paths):
        with tempfile.TemporaryDirectory(prefix="dicom-relay-edit-") as tmp:
            # Edited in a folder of its own: the routes look at the edited object.
            source = Path(tmp) / "original.dcm"
            shutil.copyfile(path, source)
            edited = Path(tmp) / "edited.dcm"
            try:
                outcome = editor.edit(source, edited)
            except BadInput as exc:
                typer.echo(f"{path}: NOT RELAYABLE ({exc.reason}): {exc.detail}")
                bad += 1
                continue
            typer.echo(f"{path}:" + ("" if outcome.changes else " no change"))
            for change in outcome.changes:
                typer.echo(f"  {change}")
            for missing in outcome.missing:
                typer.echo(f"  rule skipped (source missing, on_missing = keep): {missing}")
            if output is not None:
                shutil.copyfile(edited, output / path.name)
            if not cfg.destinations:
                continue
            routing = router.route(edited, calling_ae or outcome.source_ae)
            for name in routing.to:
                edits = router.edits.get(name)
                if edits is None:
                    typer.echo(f"  -> {name}" + (": as above" if outcome.changes else ""))
                    continue
                typer.echo(f"  -> {name}, with its own rules: {'; '.join(edits.describe())}")
                target = None
                if output is not None:
                    (output / name).mkdir(exist_ok=True)
                    target = output / name / path.name
                    target.unlink(missing_ok=True)
                try:
                    for change in edits.edit(edited, target):
                        typer.echo(f"       {change}")
                except BadInput as exc:
                    typer.echo(f"       NOT RELAYABLE to {name} ({exc.reason}): {exc.detail}")
                    bad += 1
            for name, why in routing.not_to.items():
                typer.echo(f"  not to {name}: {why}")
            if not routing.to:
                keep = ("kept in failed/unrouted/" if cfg.process.unrouted == "keep"
                        else "deleted")
                typer.echo(f"  no destination takes it: it would be {keep}")
    if bad:
        raise typer.Exit(1)


@app.command(epilog="Example: `dicom-relay check --config relay.toml`")
def check(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    no_echo: Annotated[bool, typer.Option(
        "--no-echo", help="Do not C-ECHO the destinations.")] = False,
) -> None:
    """Validate the config, find the toolkit, echo the destinations; start nothing.

    Exits 2 on a config error (naming file, key and what was expected), 1 if a destination
    does not answer, 0 when all is well.
    """
    cfg = _load(config)
    typer.echo(f"config {cfg.source}: ok ({len(cfg.destinations)} destination(s), "
               f"{len(cfg.rules)} rule(s))")
    for i, rule in enumerate(cfg.rules):
        typer.echo(f"  rule {i + 1}: {rule.describe()} (on_missing = {rule.on_missing})")
    for dest in cfg.destinations:
        extra = []
        if dest.filter is not None:
            extra.append("only " + ", ".join(
                f"{k.key}={'|'.join([*k.include, *('!' + x for x in k.exclude)])}"
                for k in dest.filter.keys))
        if dest.rules:
            extra.append("own rules: " + "; ".join(r.describe() for r in dest.rules))
        if dest.hold_until_stable:
            extra.append(f"held until quiet {dest.hold_until_stable:g} s "
                         f"(at most {dest.hold_max:g} s)")
        typer.echo(f"  destination {dest.name} ({dest.kind}): {dest.describe()}"
                   + (f" ({'; '.join(extra)})" if extra else ""))
    engine = _engine(cfg)
    typer.echo(f"engine: {engine.describe()}")
    spool_root = cfg.spool.path
    existing = next((p for p in [spool_root, *spool_root.parents] if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        typer.echo(f"spool {spool_root}: NOT WRITABLE (nearest existing folder: {existing})")
        raise typer.Exit(1)
    typer.echo(f"spool {spool_root}: writable")
    if not cfg.destinations:
        typer.echo("no [[destinations]]: `run` and `process` will refuse to start")
        raise typer.Exit(1)
    if not no_echo and not _echo_all(cfg):
        raise typer.Exit(1)


@app.command(epilog="Example: `dicom-relay status --config relay.toml`")
def status(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    failures: Annotated[int, typer.Option(help="How many recent failures to list.")] = 10,
) -> None:
    """Queue depth and oldest object per destination, spool folders, held studies, the most
    recent failures, and, when the relay serves [metrics], its counters since it started.

    The figures are those of /metrics (Prometheus): the queues read from the spool, the
    counters from the running relay.
    """
    cfg = _load(config)
    spool = spool_for(cfg)
    if not spool.root.is_dir():
        typer.echo(f"spool {spool.root} does not exist yet (the relay has not run)")
        return
    queues, folders, _ = spool_figures(spool, [d.name for d in cfg.destinations])
    samples = _running_samples(cfg)
    counters = _counters(samples)
    typer.echo(f"spool {spool.root}: " + ", ".join(f"{k} {v}" for k, v in folders.items()))
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
        typer.echo(line)
    for dest, codes in sorted(_http_statuses(samples).items()):
        typer.echo(f"{dest}: HTTP statuses since the relay started: "
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
    recent = list(spool.failures())
    if recent:
        typer.echo(f"\nrecent failures ({min(failures, len(recent))} of {len(recent)}):")
    for path, info in recent[:failures]:
        dest = f" -> {info['destination']}" if info.get("destination") else ""
        typer.echo(f"  {info.get('when', '?')} {info.get('reason', '?')}{dest}: "
                   f"{path.name}: {info.get('detail', '')}")


def _age(seconds: float) -> str:
    if seconds <= 0:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def _running_samples(cfg: Config) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The running relay's /metrics; {} when it serves none (or none answers)."""
    if cfg.metrics.listen is None:
        return {}
    try:
        return scrape(cfg.metrics.listen)
    except (OSError, ValueError):
        return {}


def _counters(samples: dict[str, list[tuple[dict[str, str], float]]]
              ) -> dict[tuple[str, str], float]:
    """(delivered|retried|failed|received, destination or calling AE) → count; {} when the
    relay serves no metrics."""
    if not samples:
        return {}
    counts: dict[tuple[str, str], float] = {}
    for name, label in (("delivered", "destination"), ("retried", "destination"),
                        ("failed", "destination"), ("received", "calling_ae")):
        for labels, value in samples.get(f"dicom_relay_{name}_objects_total", []):
            key = (name, labels.get(label, ""))
            counts[key] = counts.get(key, 0) + value
    return counts or {("delivered", ""): 0}


def _http_statuses(samples: dict[str, list[tuple[dict[str, str], float]]]
                   ) -> dict[str, dict[str, float]]:
    """DICOMweb destination → HTTP status → objects."""
    found: dict[str, dict[str, float]] = {}
    for labels, value in samples.get("dicom_relay_http_status_objects_total", []):
        found.setdefault(labels.get("destination", ""), {})[labels.get("code", "?")] = value
    return found


@app.command(epilog="Example: `dicom-relay retry --config relay.toml --reason status-A900`")
def retry(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    reason: Annotated[str | None, typer.Option(
        help="Only objects quarantined for this reason (a failed/ sub-folder name).")] = None,
) -> None:
    """Put quarantined objects (failed/) back in the queue.

    Objects that failed at a destination go back to that destination's queue; objects that
    failed processing go back to incoming/ and are processed again by a running relay.
    """
    cfg = _load(config)
    spool = spool_for(cfg)
    spool.create()
    count = 0
    for path, info in spool.failures():
        if reason is not None and path.parent.name != reason:
            continue
        target = spool.requeue(path, info)
        typer.echo(f"requeued {path.parent.name}/{path.name} -> {target.parent.name}/")
        count += 1
    typer.echo(f"{count} object(s) requeued")


@app.command(epilog="Example: `dicom-relay systemd --config /etc/dicom-relay/relay.toml "
              "--output /etc/systemd/system`")
def systemd(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Folder to write the files into; printed when left out.")]
    = None,
    user: Annotated[str, typer.Option(help="The dedicated system user to run as.")]
    = "dicom-relay",
) -> None:
    """Render systemd units: `dicom-relay.service` (run), or the split pair
    `dicom-relay-receive.service` + `dicom-relay-process.service`, with a sysusers.d entry
    for the dedicated user and a tmpfiles.d entry for the spool."""
    from relay.systemd import render_units

    cfg = _load(config)
    try:
        files = render_units(cfg, user=user)
    except (ConfigError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if output is None:
        for name, text in files.items():
            typer.echo(f"# ---- {name}\n{text}")
        return
    output.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (output / name).write_text(text)
        typer.echo(f"wrote {output / name}")
    typer.echo("then: systemd-sysusers, systemd-tmpfiles --create, systemctl daemon-reload, "
               "systemctl enable --now dicom-relay (or -receive and -process)")


@app.command(epilog="Example: `dicom-relay haproxy --config relay.toml --relay 10.0.0.11 "
              "--relay 10.0.0.12 --listen 0.0.0.0:104 --output /etc/haproxy/haproxy.cfg`")
def haproxy(
    relay_address: Annotated[list[str], typer.Option(
        "--relay", "-r", help="A relay's address: host, host:port or [IPv6]:port (port: "
        "[receiver].port). Give it once per relay.")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    listen: Annotated[str, typer.Option(
        help="Where the balancer listens for modalities (host:port).")] = "0.0.0.0:104",
    check: Annotated[str, typer.Option(
        help="Health check: `dicom` (an A-ASSOCIATE-RQ must be accepted) or `tcp` (the port "
        "accepts connections).")] = "dicom",
    check_ae: Annotated[str, typer.Option(
        help="Calling AE title of the DICOM health check.")] = "HAPROXY-CHECK",
    inter: Annotated[str, typer.Option(help="Time between health checks.")] = "2s",
    run_as: Annotated[str, typer.Option(
        help="User and group HAProxy drops to ('' to stay as started).")] = "haproxy",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="File to write; printed when left out.")] = None,
) -> None:
    """Render a ready HAProxy config (TCP mode, health checks) for several relays behind
    one address: high availability with Debian's haproxy, each relay with its own spool.

    Every relay must use the same [receiver].ae_title (modalities call one). A relay sees the
    balancer as its peer: `allowed_hosts` must include it; `allowed_calling_aets`, if set,
    must include the check's AE title.
    """
    from relay.haproxy import BalancerOptions, render_haproxy

    cfg = _load(config)
    allowed = cfg.receiver.allowed_calling_aets
    if check == "dicom" and allowed and check_ae not in allowed:
        typer.echo(f"error: {cfg.source}: receiver.allowed_calling_aets does not include the "
                   f"health check's AE title {check_ae!r}: add it, or use --check tcp",
                   err=True)
        raise typer.Exit(2)
    options = BalancerOptions(listen=listen, check=check, check_ae=check_ae, inter=inter,
                              run_as=run_as or None)
    try:
        text = render_haproxy(cfg, relay_address, options)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text)
    typer.echo(f"wrote {output}; check it with `haproxy -c -f {output}`")


def version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dicom-relay {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option(
        "--version", callback=version_callback, is_eager=True, help="Print the version.")]
    = False,
) -> None:
    """A DICOM relay (PACS proxy): receive by C-STORE, rewrite with rules, forward, delete
    only once delivered."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()

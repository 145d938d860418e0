"""Tools around the relay: `send` files to a destination, `echo` destinations, try the
rules and routes with `edit`, `check` a configuration."""

from __future__ import annotations

import ipaddress
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from relay.cli.common import (
    DEFAULT_CONFIG,
    ConfigOpt,
    VerboseOpt,
    engine_for,
    example,
    expand,
    load,
)
from relay.config.model import ConfigError, Destination, join_host_port
from relay.console.users import Users, UsersFileError

if TYPE_CHECKING:  # the pipeline is imported by the verbs that use it (relay.cli.common)
    from relay.config.model import Config
    from relay.pipeline.processor import Plan
    from relay.route.router import Router


def send(
    destination: Annotated[str, typer.Argument(help="A [[destinations]] name from the config.")],
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (recursive).")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    verbose: VerboseOpt = False,
) -> None:
    """Send files as they are (no rules, nothing deleted) to a destination, with a progress bar.

    Exits 1 if any file was not stored, listing each with the destination's status.
    """
    from relay.send.results import Outcome
    from relay.send.stow import transport_for

    cfg = load(config, verbose)
    try:
        dest = cfg.destination(destination)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    files = expand(paths)
    engine = engine_for(cfg)
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
    cfg = load(config, verbose)
    if receiver:
        from relay.send.results import DestinationUnavailable, ToolFailure
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
    from relay.send.results import DestinationUnavailable, ToolFailure
    from relay.send.stow import transport_for

    engine = engine_for(cfg)
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
    from relay.edit.editor import BadInput
    from relay.pipeline.processor import plan
    from relay.pipeline.relay import rules_and_routes

    cfg = load(config, verbose)
    if not dry_run and output is None:
        typer.echo("error: give --dry-run to see the changes, or --output DIR to write edited "
                   "copies", err=True)
        raise typer.Exit(2)
    if output is not None:
        output.mkdir(parents=True, exist_ok=True)
    editor, router = rules_and_routes(cfg, engine_for(cfg))
    bad = 0
    for path in expand(paths):
        with tempfile.TemporaryDirectory(prefix="dicom-relay-edit-") as tmp:
            # Edited in a folder of its own: the routes look at the edited object.
            source = Path(tmp) / "original.dcm"
            shutil.copyfile(path, source)
            edited = Path(tmp) / "edited.dcm"

            def place(name: str, _index: int, file: Path = path) -> Path | None:
                if output is None:
                    return None  # a dry run
                (output / name).mkdir(exist_ok=True)
                return output / name / file.name

            try:
                # The relay's own flow: global rules, routes, each destination's copy.
                result = plan(editor, router, source, edited, place, sync=False,
                              calling_ae=calling_ae)
            except BadInput as exc:
                typer.echo(f"{path}: NOT RELAYABLE ({exc.reason}): {exc.detail}")
                bad += 1
                continue
            bad += _show_plan(path, result, router, cfg, output, edited)
    if bad:
        raise typer.Exit(1)


def _show_plan(path: Path, result: Plan, router: Router, cfg: Config, output: Path | None,
               edited: Path) -> int:
    """Print what the relay would do with one file (and write its copies under `output`);
    how many of its copies could not be made."""
    outcome = result.outcome
    typer.echo(f"{path}:" + ("" if outcome.changes else " no change"))
    for change in outcome.changes:
        typer.echo(f"  {change}")
    for missing in outcome.missing:
        typer.echo(f"  rule skipped (source missing, on_missing = keep): {missing}")
    if output is not None:
        shutil.copyfile(edited, output / path.name)
    if not cfg.destinations:
        return 0
    if result.routing is None:
        typer.echo(f"  NOT RELAYABLE (unreadable): {result.route_error}")
        return 1
    bad = 0
    copies = result.copies
    for name in result.routing.to:
        edits = router.edits.get(name)
        if edits is None:
            typer.echo(f"  -> {name}" + (": as above" if outcome.changes else ""))
            continue
        typer.echo(f"  -> {name}, with its own rules: {'; '.join(edits.describe())}")
        if name in copies.failed:
            exc = copies.failed[name]
            typer.echo(f"       NOT RELAYABLE to {name} ({exc.reason}): {exc.detail}")
            bad += 1
            continue
        for change in copies.changes[name]:
            typer.echo(f"       {change}")
        made = copies.files.get(name)
        if output is not None and made is not None and made.parent.name != name:
            # Destinations whose rules are written the same share one edit.
            (output / name).mkdir(exist_ok=True)
            shutil.copyfile(made, output / name / path.name)
    for name, why in result.routing.not_to.items():
        typer.echo(f"  not to {name}: {why}")
    if not result.routing.to:
        keep = "kept in failed/unrouted/" if cfg.process.unrouted == "keep" else "deleted"
        typer.echo(f"  no destination takes it: it would be {keep}")
    return bad


def check(
    config: ConfigOpt = Path(DEFAULT_CONFIG),
    no_echo: Annotated[bool, typer.Option(
        "--no-echo", help="Do not C-ECHO the destinations.")] = False,
) -> None:
    """Validate the config, find the toolkit, echo the destinations; start nothing.

    Exits 2 on a config error (naming file, key and what was expected), 1 if a destination
    does not answer, 0 when all is well.
    """
    cfg = load(config)
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
    engine = engine_for(cfg)
    typer.echo(f"engine: {engine.describe()}")
    spool_root = cfg.spool.path
    existing = next((p for p in [spool_root, *spool_root.parents] if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        typer.echo(f"spool {spool_root}: NOT WRITABLE (nearest existing folder: {existing})")
        raise typer.Exit(1)
    typer.echo(f"spool {spool_root}: writable")
    for line in console_lines(cfg):
        typer.echo(line)
    if not cfg.destinations:
        typer.echo("no [[destinations]]: `run` and `process` will refuse to start")
        raise typer.Exit(1)
    if not no_echo and not _echo_all(cfg):
        raise typer.Exit(1)


def console_lines(cfg: Config) -> list[str]:
    """What `check` says of the console: where, with which users, and a warning when it is
    reachable from other hosts without TLS (passwords and patient data in clear)."""
    if cfg.console.listen is None:
        return ["console: off ([console] listen not set)"]
    host, port = cfg.console.listen
    scheme = "https" if cfg.console.tls is not None else "http"
    lines = [f"console: {scheme}://{join_host_port(host, port)}/ (users: {cfg.users_file})"]
    try:
        users = Users(cfg.users_file).names()
    except UsersFileError as exc:
        users = []
        lines.append(f"WARNING: {exc}")
    if not users:
        lines.append("WARNING: no console user or API token yet: add one with "
                     "`dicom-relay user add NAME --role admin`")
    if cfg.console.tls is None and not is_loopback(host):
        lines.append(f"WARNING: [console] listen = {join_host_port(host, port)} is reachable "
                     "from other hosts without TLS: passwords, tokens and patient data cross "
                     "the network in clear. Set [console.tls] cert and key, or listen on "
                     "127.0.0.1 behind a TLS proxy.")
    return lines


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def register(app: typer.Typer) -> None:
    app.command(epilog=example("dicom-relay send --config relay.toml central /data/study1/"))(send)
    app.command(epilog=example("dicom-relay echo --config relay.toml central"))(echo)
    app.command(epilog=example("dicom-relay edit --config relay.toml --dry-run study/*.dcm"))(edit)
    app.command(epilog=example("dicom-relay check --config relay.toml"))(check)

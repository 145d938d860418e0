"""Files the relay renders for its surroundings: systemd units and an HAProxy config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from relay.cli.common import DEFAULT_CONFIG, ConfigOpt, example, load
from relay.config.model import ConfigError
from relay.ops.systemd import render_units


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
    cfg = load(config)
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
    from relay.ops.haproxy import BalancerOptions, render_haproxy

    cfg = load(config)
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
    rc = cfg.receiver
    if rc.per_host < rc.max_associations:
        typer.echo(f"note: {cfg.source}: behind the balancer every connection comes from it, "
                   f"and one host may hold {rc.per_host} of the {rc.max_associations} "
                   "associations: set [receiver] max_associations_per_host = "
                   f"{rc.max_associations} on each relay", err=True)
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text)
    typer.echo(f"wrote {output}; check it with `haproxy -c -f {output}`")


def register(app: typer.Typer) -> None:
    app.command(epilog=example(
        "dicom-relay systemd --config /etc/dicom-relay/relay.toml --output "
        "/etc/systemd/system"))(systemd)
    app.command(epilog=example(
        "dicom-relay haproxy --config relay.toml --relay 10.0.0.11 --relay "
        "10.0.0.12 --listen 0.0.0.0:104 --output /etc/haproxy/haproxy.cfg"))(haproxy)

"""The relay's services: `run` (everything), or `receive` and `process` apart (the original
relay_init / relay_process pair)."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import typer

from relay import __version__
from relay.cli.common import DEFAULT_CONFIG, ConfigOpt, VerboseOpt, engine_for, example, load

if TYPE_CHECKING:
    from relay.config.model import Config
    from relay.pipeline.relay import Relay

log = logging.getLogger("relay")


def handle_signals(relay: Relay) -> None:
    """SIGTERM and SIGINT ask `relay` to stop, SIGHUP to reload its config. The handlers only
    note what was asked; relay.wait() acts on it in the main thread. A handler runs between
    two steps of whatever that thread was doing: it must not take a lock (Event.set() does,
    one the main thread holds while it leaves an Event.wait()) nor write a log line (the
    stream's own lock)."""

    def on_stop(signum: int, _frame: FrameType | None) -> None:
        relay.stop_signal = signum

    def on_hangup(_signum: int, _frame: FrameType | None) -> None:
        relay.reload_requested = True

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hangup)
    # The interpreter writes each signal's number there, whichever thread it reached: the
    # main loop wakes at once rather than at its next look.
    signal.set_wakeup_fd(relay.wake_fd, warn_on_full_buffer=False)


def serve(cfg: Config, *, receive: bool, process: bool) -> None:
    from relay.pipeline.relay import Relay

    # Every file the relay (and the tools it starts) writes holds patient data: readable by
    # the relay's user only, whatever umask it was started with.
    os.umask(0o077)
    serve_console = process and cfg.console.listen is not None
    if serve_console:
        # Imported only where a console is set: the web stack (FastAPI, uvicorn) costs a
        # start ~0.3 s of CPU. Before the receiver opens, so the console follows it at once.
        from relay.console.server import ConsoleServer
    engine = engine_for(cfg)
    relay = Relay(cfg, engine, receive=receive, process=process)
    handle_signals(relay)
    try:
        relay.start()
    except (OSError, RuntimeError) as exc:
        log.error("cannot start: %s", exc)
        raise typer.Exit(1) from None
    console = None
    if serve_console:
        console = ConsoleServer(relay)
        try:
            console.start()
        except OSError as exc:
            log.error("cannot start: %s", exc)
            relay.stop()
            raise typer.Exit(1) from None
    parts = [p for p, on in (("receive", receive), ("process+send", process)) if on]
    log.info("dicom-relay %s running (%s) on the %s engine, spool %s", __version__,
             " + ".join(parts), engine.describe(), cfg.spool.path)
    relay.wait()
    if console is not None:
        console.stop()
    relay.stop()
    log.info("stopped")


def run(config: ConfigOpt = Path(DEFAULT_CONFIG), verbose: VerboseOpt = False) -> None:
    """Receive, rewrite and forward, in the foreground (for systemd or Docker).

    Stops cleanly on SIGTERM or Ctrl-C; whatever is not yet delivered stays in the spool and is
    sent after the next start. SIGHUP (`systemctl reload dicom-relay`) re-reads the config:
    rules, destinations, filters and [sender] apply from the next object, without dropping an
    association; receiver, spool, toolkit, metrics and audit settings need a restart (the log
    says so); a config that does not validate is refused and the running one stays.
    """
    serve(load(config, verbose), receive=True, process=True)


def receive(config: ConfigOpt = Path(DEFAULT_CONFIG), verbose: VerboseOpt = False) -> None:
    """Only receive: a C-STORE SCP writing complete objects into spool/incoming/.

    Pair it with `dicom-relay process` (two services, as the original relay_init/relay_process).
    """
    serve(load(config, verbose), receive=True, process=False)


def process(config: ConfigOpt = Path(DEFAULT_CONFIG), verbose: VerboseOpt = False) -> None:
    """Only process: watch spool/incoming/, apply the rules, forward, delete once delivered."""
    serve(load(config, verbose), receive=False, process=True)


def register(app: typer.Typer) -> None:
    app.command(epilog=example("dicom-relay run --config /etc/dicom-relay/relay.toml"))(run)
    app.command(epilog=example("dicom-relay receive --config relay.toml"))(receive)
    app.command(epilog=example("dicom-relay process --config relay.toml"))(process)

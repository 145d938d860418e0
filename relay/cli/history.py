"""`dicom-relay history …`: the history database from the command line (the console and the
API read it; `run` and `process` write it)."""

from __future__ import annotations

import calendar
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from relay.cli.common import DEFAULT_CONFIG, ConfigOpt, example, load
from relay.history.rows import ops_of_audit_line

if TYPE_CHECKING:
    from relay.history.rows import Op

history_app = typer.Typer(help="The history database: what happened to every object.",
                          no_args_is_help=True)


def audit_time(text: str) -> float:
    """An audit line's time (UTC, '2026-12-04T15:25:31.042Z') as seconds since the epoch."""
    main, _, rest = text.rstrip("Z").partition(".")
    seconds = calendar.timegm(time.strptime(main, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (int(rest) / 10 ** len(rest) if rest.isdigit() else 0.0)


@history_app.command("import", epilog=example(
    "dicom-relay history import /srv/dicom_repo/audit.jsonl --config relay.toml"))
def import_audit(
    audit: Annotated[Path, typer.Argument(help="An audit log (audit.jsonl, or a rotated "
                                          "copy of it).", exists=True, dir_okay=False)],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """Fill the history from an existing audit log.

    Each line becomes a line of its object's timeline, under this relay's name ([history]
    relay_name), with its state at each destination. The audit log names objects and SOP
    Instance UIDs, not studies or patients: the study search does not find objects known
    only from an imported log. Importing the same log twice writes its lines twice.
    """
    from sqlalchemy.exc import SQLAlchemyError  # with the store: only this verb needs them

    from relay.history.store import HistoryStore

    cfg = load(config)
    store = HistoryStore(cfg.history_url, cfg.relay_name)
    try:
        store.upgrade()
        ops: list[Op] = []
        lines = skipped = 0
        with audit.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    entry = json.loads(line)
                    made = ops_of_audit_line(entry, audit_time(str(entry["time"])))
                except (ValueError, KeyError, TypeError, AttributeError):
                    skipped += 1
                    typer.echo(f"{audit}:{number}: not an audit line, skipped", err=True)
                    continue
                lines += 1
                ops.extend(made)
                if len(ops) >= 5000:
                    store.apply(ops)
                    ops = []
        store.apply(ops)
    except SQLAlchemyError as exc:
        typer.echo(f"history database {cfg.history_url}: {str(exc).splitlines()[0]}",
                   err=True)
        raise typer.Exit(1) from None
    finally:
        store.close()
    typer.echo(f"{lines} audit line(s) imported into the history, {skipped} skipped")


def register(app: typer.Typer) -> None:
    app.add_typer(history_app, name="history")

"""What every verb shares: the --config and --verbose options, loading the config (errors
exit 2 naming file and key), logging, and choosing the engine.

The verbs' modules import the pipeline (pydicom, SQLAlchemy, lxml: ~0.6 s) inside the verb
that needs it, not at the top: `dicom-relay --help`, and every verb, then pay only for what
they use (tests/test_cli.py holds them to it)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from relay.config.model import ConfigError
from relay.receive.supervisor import LOG_PLAIN_ENV

if TYPE_CHECKING:
    from relay.config.model import Config
    from relay.toolkits.base import Engine

log = logging.getLogger("relay")

DEFAULT_CONFIG = "/etc/dicom-relay/relay.toml"
ConfigOpt = Annotated[Path, typer.Option(
    "--config", "-c", envvar="DICOM_RELAY_CONFIG",
    help="The relay's TOML config file (env DICOM_RELAY_CONFIG).")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level.")]


def example(command: str) -> str:
    """The epilog of a verb's --help: one command line to copy."""
    return f"Example: `{command}`"


def setup_logging(level: str, verbose: bool = False) -> None:
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
    # alembic names each of its plugins at INFO when imported (the history store, imported
    # by the verbs after this) and each migration: the history says it in one line.
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)


def load(config: Path, verbose: bool = False) -> Config:
    from relay.config.load import load_config

    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None
    setup_logging(cfg.log_level, verbose)
    return cfg


def engine_for(cfg: Config) -> Engine:
    from relay.toolkits.select import select_engine

    try:
        return select_engine(cfg)
    except ConfigError as exc:
        typer.echo(f"config error: {exc}", err=True)
        raise typer.Exit(2) from None


def expand(paths: list[Path]) -> list[Path]:
    """Files, and the files under folders (recursive, sorted); exits 2 naming what is not
    there."""
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

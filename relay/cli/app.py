"""`dicom-relay`: the command line. The verbs and nothing else; the work is elsewhere. Each
group of verbs is a module of its own that registers them here, in the order `--help` lists
them."""

from __future__ import annotations

from typing import Annotated

import typer

from relay import __version__
from relay.cli import access, history, queues, render, serve, tools

app = typer.Typer(
    name="dicom-relay",
    help="A DICOM relay (PACS proxy): receive studies by C-STORE, rewrite their metadata with "
    "rules, forward them to one or more PACS, delete them only once each PACS confirmed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
for group in (serve, tools, queues, history, access, render):
    group.register(app)


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

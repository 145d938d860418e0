"""`dicom-relay user …` and `dicom-relay token …`: who may use the console and the API
([console] users_file)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from relay.cli.common import DEFAULT_CONFIG, ConfigOpt, example, load
from relay.console.users import ROLES, Users, UsersFileError

user_app = typer.Typer(help="Console users (name, role, password).", no_args_is_help=True)
token_app = typer.Typer(help="API tokens (Authorization: Bearer …).", no_args_is_help=True)
RoleOpt = Annotated[str, typer.Option(
    "--role", help="viewer (reads), operator (also retries, releases, pauses), admin (also "
    "deletes and reloads).")]


def _users(config: Path) -> Users:
    cfg = load(config)
    try:
        return Users(cfg.users_file)
    except UsersFileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _check_role(role: str) -> None:
    if role not in ROLES:
        typer.echo(f"error: --role: expected one of {', '.join(ROLES)}, got {role!r}", err=True)
        raise typer.Exit(2)


@user_app.command("add", epilog=example(
    "dicom-relay user add maria --role operator --config relay.toml"))
def user_add(
    name: Annotated[str, typer.Argument(help="The login name.")],
    role: RoleOpt = "viewer",
    password_stdin: Annotated[bool, typer.Option(
        "--password-stdin", help="Read the password from standard input (first line), "
        "for scripts; otherwise it is asked twice.")] = False,
    config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """Add a console user, or change an existing user's role and password."""
    _check_role(role)
    users = _users(config)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        users.add_user(name, role, password)
    except ValueError as exc:
        typer.echo(f"error: expected {exc}", err=True)
        raise typer.Exit(2) from None
    users.save()
    typer.echo(f"user {name} ({role}) saved in {users.path}")


@user_app.command("remove", epilog=example("dicom-relay user remove maria --config relay.toml"))
def user_remove(
    name: Annotated[str, typer.Argument(help="A user's or a token's name.")],
    config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """Remove a user (or a token): their sessions end at their next request."""
    users = _users(config)
    if not users.remove(name):
        typer.echo(f"error: no user or token named {name!r} in {users.path}", err=True)
        raise typer.Exit(1)
    users.save()
    typer.echo(f"{name} removed from {users.path}")


@user_app.command("list", epilog=example("dicom-relay user list --config relay.toml"))
def user_list(config: ConfigOpt = Path(DEFAULT_CONFIG)) -> None:
    """List users and tokens with their roles (never a password or a token)."""
    for name, kind, role in _users(config).names():
        typer.echo(f"{name}\t{kind}\t{role}")


@token_app.command("add", epilog=example(
    "dicom-relay token add nightly-check --role viewer --config relay.toml"))
def token_add(
    name: Annotated[str, typer.Argument(help="What the token is for (shown in the audit).")],
    role: RoleOpt = "viewer",
    config: ConfigOpt = Path(DEFAULT_CONFIG),
) -> None:
    """Make an API token and print it, once: only its hash is kept. `user remove NAME`
    revokes it."""
    _check_role(role)
    users = _users(config)
    try:
        token = users.add_token(name, role)
    except ValueError as exc:
        typer.echo(f"error: expected {exc}", err=True)
        raise typer.Exit(2) from None
    users.save()
    typer.echo(token)


def register(app: typer.Typer) -> None:
    app.add_typer(user_app, name="user")
    app.add_typer(token_app, name="token")

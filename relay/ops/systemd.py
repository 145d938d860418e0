"""systemd units for the relay, rendered from templates/systemd/ with jinja2.

Three services, as the original relay had: `dicom-relay.service` (run: everything), or the
split pair `dicom-relay-receive.service` + `dicom-relay-process.service`; plus a sysusers.d
entry for the dedicated user and a tmpfiles.d entry that creates the spool 0700.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jinja2

from relay.config.model import Config, ConfigError

_PLAIN = re.compile(r"^[A-Za-z0-9_./:@=+,-]+$")


def templates_dir() -> Path:
    """templates/ of a checkout, or the copy installed with the package (relay/templates/)."""
    package = Path(__file__).resolve().parent.parent  # relay/
    for candidate in (package.parent / "templates", package / "templates"):
        if (candidate / "systemd").is_dir():
            return candidate
    raise FileNotFoundError(f"templates not found beside {package}")


def systemd_quote(arg: str) -> str:
    """One ExecStart word: quoted when needed, % doubled (systemd specifiers)."""
    arg = arg.replace("%", "%%")
    if _PLAIN.match(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def default_executable() -> list[str]:
    script = Path(sys.executable).parent / "dicom-relay"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "relay"]


def render_units(config: Config, *, user: str = "dicom-relay",
                 executable: list[str] | None = None) -> dict[str, str]:
    """File name → content of every unit and companion file."""
    spool = str(config.spool.path)
    if re.search(r"\s", spool):
        raise ConfigError(f"{config.source}: spool.path: expected a path without spaces for "
                          f"systemd's ReadWritePaths=, got {spool!r}")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", user):
        raise ValueError(f"--user: expected a system user name, got {user!r}")
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates_dir() / "systemd"),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True,
        lstrip_blocks=True, autoescape=False)  # noqa: S701 - unit files, not HTML
    exe = executable or default_executable()
    config_path = str(config.source.resolve())
    # /home and /root are hidden from the service unless something it needs lives there
    # (a virtualenv in a home folder): then they are read-only instead.
    needs_home = any(p.startswith(("/home/", "/root/")) for p in [*exe, config_path, spool])
    common = {
        "user": user, "spool": spool, "config": config_path, "port": config.receiver.port,
        "java": config.toolkit.engine in ("dcm4che", "auto"),
        "protect_home": "read-only" if needs_home else "yes",
    }
    units = {
        "dicom-relay.service": ("run", "DICOM relay: receive, rewrite and forward", "", True),
        "dicom-relay-receive.service": ("receive", "DICOM relay: receiver", "", True),
        "dicom-relay-process.service": ("process", "DICOM relay: rewrite and forward",
                                        "dicom-relay-receive.service", False),
    }
    out = {}
    unit = env.get_template("unit.service.j2")
    for name, (verb, description, after, listens) in units.items():
        exec_start = " ".join(systemd_quote(a) for a in [*exe, verb, "--config", config_path])
        out[name] = unit.render(
            unit_name=name, description=description, after=after, exec_start=exec_start,
            privileged_port=listens and config.receiver.port < 1024, **common)
    out["dicom-relay.sysusers.conf"] = env.get_template("sysusers.conf.j2").render(**common)
    out["dicom-relay.tmpfiles.conf"] = env.get_template("tmpfiles.conf.j2").render(**common)
    return out

"""Rendered systemd units parse, name the right ExecStart, carry the hardening, and pass
`systemd-analyze verify` where that tool exists."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config.load import load_config
from relay.config.model import ConfigError
from relay.ops.systemd import render_units, systemd_quote

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "templates" / "relay.toml"
EXE = ["/opt/dicom-relay/bin/dicom-relay"]


def parse(text: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(text)
    return parser


def test_units_parse_and_run_the_right_verb() -> None:
    cfg = load_config(EXAMPLE)
    files = render_units(cfg, executable=EXE)
    assert set(files) == {"dicom-relay.service", "dicom-relay-receive.service",
                          "dicom-relay-process.service", "dicom-relay.sysusers.conf",
                          "dicom-relay.tmpfiles.conf"}
    for name, verb in (("dicom-relay.service", "run"), ("dicom-relay-receive.service", "receive"),
                       ("dicom-relay-process.service", "process")):
        unit = parse(files[name])
        service = unit["Service"]
        assert service["ExecStart"] == f"{EXE[0]} {verb} --config {EXAMPLE}"
        assert service["User"] == "dicom-relay"
        assert service["ReadWritePaths"] == str(cfg.spool.path)
        assert service["Restart"] == "on-failure"
        assert service["NoNewPrivileges"] == "yes"
        assert service["ProtectSystem"] == "strict"
        assert service["CapabilityBoundingSet"] == ""
        assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"  # systemctl reload
        assert service["KillMode"] == "mixed"  # the relay stops its own children
        assert unit["Install"]["WantedBy"] == "multi-user.target"
    process = parse(files["dicom-relay-process.service"])
    assert "dicom-relay-receive.service" in process["Unit"]["After"]
    assert files["dicom-relay.tmpfiles.conf"].splitlines()[-1] == (
        f"d {cfg.spool.path} 0700 dicom-relay dicom-relay -")


def test_privileged_port_gets_only_that_capability(tmp_path: Path) -> None:
    cfg_file = tmp_path / "relay.toml"
    cfg_file.write_text('[receiver]\nport = 104\n[spool]\npath = "/srv/dicom_repo"\n')
    files = render_units(load_config(cfg_file), executable=EXE)
    run = parse(files["dicom-relay.service"])["Service"]
    assert run["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert run["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert "AmbientCapabilities" not in parse(files["dicom-relay-process.service"])["Service"]


def test_quoting_of_odd_paths(tmp_path: Path) -> None:
    assert systemd_quote("/etc/relay.toml") == "/etc/relay.toml"
    assert systemd_quote("/etc/my relay/100%.toml") == '"/etc/my relay/100%%.toml"'
    odd = tmp_path / "my config"
    odd.mkdir()
    cfg_file = odd / "relay.toml"
    cfg_file.write_text('[spool]\npath = "/srv/dicom_repo"\n')
    run = parse(render_units(load_config(cfg_file), executable=EXE)["dicom-relay.service"])
    assert run["Service"]["ExecStart"] == f'{EXE[0]} run --config "{cfg_file}"'


def test_spool_with_spaces_is_refused(tmp_path: Path) -> None:
    cfg_file = tmp_path / "relay.toml"
    cfg_file.write_text('[spool]\npath = "/srv/dicom repo"\n')
    with pytest.raises(ConfigError, match="spool.path"):
        render_units(load_config(cfg_file), executable=EXE)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # Rendered as the CLI does, with this interpreter as the real ExecStart executable.
    result = subprocess.run([sys.executable, "-m", "relay", "systemd", "--config", str(EXAMPLE),
                             "--output", str(tmp_path)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    units = sorted(str(p) for p in tmp_path.glob("*.service"))
    assert len(units) == 3
    verify = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True,
                            text=True, check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr

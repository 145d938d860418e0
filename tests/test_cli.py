"""The CLI verbs as a PACS administrator types them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicomdata import ct_series
from peers import EG_RULE, ENGINES, Orthanc, RelayProcess, free_port, relay_config

REPO = Path(__file__).resolve().parent.parent
VERBS = ["run", "receive", "process", "send", "echo", "edit", "check", "status", "retry",
         "systemd", "haproxy", "history import", "user add", "user remove", "user list",
         "token add"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, check=False)


def config(tmp_path: Path, dest_port: int, rules: str = "", aet: str = "ORTHANC",
           receiver_port: int | None = None, engine: str = "embedded") -> Path:
    return relay_config(tmp_path / "relay.toml", port=receiver_port or free_port(),
                        spool=tmp_path / "spool", engine=engine, rules=rules,
                        destinations=[("central", aet, dest_port)])




@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_with_an_example(verb: str) -> None:
    result = cli(*verb.split(), "--help")
    assert result.returncode == 0, result.stderr
    assert "Example:" in result.stdout and f"dicom-relay {verb}" in result.stdout


def test_help_shows_flags_as_flags() -> None:
    """A flag takes no value: its help shows none (typer 0.29 printed '--no-echo <bool>')."""
    text = cli("check", "--help").stdout
    assert "--no-echo" in text and "--config" in text
    assert "<bool>" not in text.lower() and "BOOLEAN" not in text


def test_a_start_pays_for_no_console_it_does_not_serve() -> None:
    """Loading the CLI (every verb, every start of the relay) neither hashes a password
    (argon2id: ~0.1 s of CPU and 64 MiB, once made at import for unknown-user logins) nor
    imports the web stack; the console makes its dummy hash when it starts."""
    probe = ("import sys, relay.cli.app, relay.console.users as u; "
             "print(u.dummy_hash.cache_info().currsize, 'fastapi' in sys.modules, "
             "'uvicorn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["0", "False", "False"]


def test_help_loads_none_of_the_pipeline() -> None:
    """`dicom-relay --help` (and the CLI before a verb runs) imports no DICOM, database,
    XML or network library: each verb imports what it uses (it took ~1 s when the CLI
    imported them all, 0.3 s without)."""
    heavy = ["pydicom", "pynetdicom", "lxml", "sqlalchemy", "alembic", "prometheus_client",
             "requests", "fastapi", "relay.pipeline.relay", "relay.toolkits.select"]
    probe = ("import sys, relay.cli.app; "
             f"print(' '.join(m for m in {heavy!r} if m in sys.modules) or 'none')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "none"


def test_a_receiving_process_loads_no_database_library() -> None:
    """The embedded engine's receiving child (`dicom-relay receive`) writes no history unless
    it answers queries or commitment: the pipeline imports SQLAlchemy and alembic (~0.2 s
    of each start) only where a history writer is made."""
    probe = ("import sys, relay.pipeline.relay; "
             "print([m for m in ('sqlalchemy', 'alembic') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_a_start_logs_what_the_relay_says_not_its_libraries(tmp_path: Path) -> None:
    """The log of a start (the embedded engine: its receiver child logs too) has the relay's
    lines, not the libraries' narration: alembic names each plugin at INFO when imported."""
    port = free_port()
    relay = RelayProcess(config(tmp_path, free_port(), receiver_port=port), tmp_path).start(port)
    assert relay.stop() == 0
    log = relay.output()
    assert "running (receive + process+send)" in log
    assert [line for line in log.splitlines()
            if "alembic" in line or "sqlalchemy" in line or "Traceback" in line] == []


def test_check_reports_config_errors_with_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[receiver]\nport = "eleven"\n')
    result = cli("check", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}: receiver.port: expected an integer 1-65535, got str 'eleven'" in result.stderr


def test_check_echoes_destinations(tmp_path: Path, orthanc: Orthanc) -> None:
    ok = cli("check", "--config", str(config(tmp_path, orthanc.dicom_port, EG_RULE)))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "rule 1: PatientID := EthnicGroup" in ok.stdout
    assert "engine: embedded" in ok.stdout and "ok   central" in ok.stdout
    orthanc.stop()
    down = cli("check", "--config", str(config(tmp_path, orthanc.dicom_port)))
    assert down.returncode == 1 and "FAIL central" in down.stdout


def test_edit_dry_run_shows_before_and_after(tmp_path: Path) -> None:
    ct_series(tmp_path / "ct", 2, ethnic_group="NEWID")
    cfg = config(tmp_path, 104, EG_RULE)
    before = {p: p.read_bytes() for p in (tmp_path / "ct").iterdir()}
    result = cli("edit", "--config", str(cfg), "--dry-run", str(tmp_path / "ct"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("PatientID: '1CT1' -> 'NEWID'") == 2
    assert before == {p: p.read_bytes() for p in (tmp_path / "ct").iterdir()}, "nothing written"


def test_edit_output_and_not_relayable(tmp_path: Path) -> None:
    ct_series(tmp_path / "ct", 1, ethnic_group="NEWID")
    (tmp_path / "ct" / "junk.txt").write_text("junk")
    result = cli("edit", "--config", str(config(tmp_path, 104, EG_RULE)), "--output",
                 str(tmp_path / "edited"), str(tmp_path / "ct"))
    assert result.returncode == 1
    assert "junk.txt: NOT RELAYABLE (not-dicom)" in result.stdout
    assert (tmp_path / "edited" / "ct00000.dcm").exists()


def test_send_reports_each_file(tmp_path: Path, orthanc: Orthanc) -> None:
    ct_series(tmp_path / "ct", 5)
    cfg = config(tmp_path, orthanc.dicom_port)
    result = cli("send", "--config", str(cfg), "central", str(tmp_path / "ct"))
    assert result.returncode == 0, result.stderr
    assert "5/5 stored at central" in result.stdout
    assert orthanc.count() == 5
    assert len(list((tmp_path / "ct").iterdir())) == 5, "send never deletes"
    unknown = cli("send", "--config", str(cfg), "nowhere", str(tmp_path / "ct"))
    assert unknown.returncode == 2 and "no destination named 'nowhere'" in unknown.stderr


def test_echo_unknown_and_down(tmp_path: Path) -> None:
    result = cli("echo", "--config", str(config(tmp_path, free_port())))
    assert result.returncode == 1 and "FAIL central" in result.stdout


def test_status_and_retry(tmp_path: Path) -> None:
    cfg = config(tmp_path, 104)
    spool = tmp_path / "spool"
    assert "does not exist yet" in cli("status", "--config", str(cfg)).stdout
    failed = spool / "failed" / "not-dicom"
    failed.mkdir(parents=True)
    (failed / "x.dcm").write_bytes(b"junk")
    (failed / "x.dcm.json").write_text(
        '{"reason": "not-dicom", "detail": "no DICM", "stage": "process", '
        '"destination": null, "when": "2026-01-01T00:00:00Z"}')
    (spool / "incoming").mkdir()
    status = cli("status", "--config", str(cfg))
    assert status.returncode == 0
    assert "failed" in status.stdout and "not-dicom: x.dcm: no DICM" in status.stdout
    retried = cli("retry", "--config", str(cfg))
    assert "1 object(s) requeued" in retried.stdout
    assert (spool / "incoming" / "x.dcm").exists() and not (failed / "x.dcm").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_run_refuses_a_taken_port(tmp_path: Path, engine: str) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("run", "--config", str(config(tmp_path, 104, receiver_port=port,
                                                   engine=engine)))
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "already in use" in result.stderr


def test_echo_receiver_is_a_health_check(tmp_path: Path) -> None:
    port = free_port()
    cfg = config(tmp_path, 104, receiver_port=port)
    assert cli("echo", "--config", str(cfg), "--receiver").returncode == 1
    from peers import RelayProcess

    relay = RelayProcess(cfg, tmp_path, verb="receive").start(port)
    try:
        result = cli("echo", "--config", str(cfg), "--receiver")
        assert result.returncode == 0 and "ok   receiver DICOMRELAY@127.0.0.1" in result.stdout
    finally:
        relay.stop()


def test_edit_dry_run_shows_routes_and_each_destinations_changes(tmp_path: Path) -> None:
    from dicomdata import identified_study

    identified_study(tmp_path / "study", [1])
    [path] = sorted((tmp_path / "study").rglob("*.dcm"))
    (tmp_path / "deid.key").write_bytes(b"k" * 32)
    cfg = relay_config(tmp_path / "relay.toml", port=free_port(), spool=tmp_path / "spool",
                       rules=EG_RULE, destinations=[
        ("diagnostic", "DIAG", 104, '[destinations.filter]\nModality = ["CT", "MR"]'),
        ("mr-only", "MRPACS", 104, '[destinations.filter]\nModality = "MR"'),
        ("research", "RESEARCH", 104, '[[destinations.rules]]\ndeidentify = "basic"\n'
         f'secret_file = "{tmp_path / "deid.key"}"')])
    before = path.read_bytes()
    result = cli("edit", "--config", str(cfg), "--dry-run", "--calling-ae", "SCANNER",
                 str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "  PatientID: 'HC-0042' -> 'EG-STUDY'" in out
    assert "  -> diagnostic: as above" in out
    assert "  not to mr-only: Modality 'CT' matches none of MR" in out
    assert "  -> research, with its own rules: deidentify basic" in out
    assert "       PatientName: 'Pérez^Juan^Carlos' -> ''" in out
    assert "       PatientID: 'EG-STUDY' -> 'ANON-" in out
    assert path.read_bytes() == before, "a dry run writes nothing"
    assert not (tmp_path / "spool").exists()


def test_edit_dry_run_shows_burned_in_text_held_back_or_redacted(tmp_path: Path) -> None:
    from dicomdata import bundled, copy_with_new_uids

    sc = tmp_path / "sc.dcm"
    copy_with_new_uids(bundled("SC_rgb_small_odd.dcm"), sc)  # a 3 x 3 capture, no flag
    (tmp_path / "deid.key").write_bytes(b"k" * 32)
    deid = f'[[destinations.rules]]\ndeidentify = "basic"\nsecret_file = "{tmp_path / "deid.key"}"'
    cfg = relay_config(tmp_path / "relay.toml", port=free_port(), spool=tmp_path / "spool",
                       destinations=[
        ("plain", "PLAIN", 104, deid),
        ("redacts", "REDACTS", 104, f'{deid}\n[[destinations.rules]]\n'
         'redact = [{ Modality = "OT", Columns = 3, regions = [[0, 0, 3, 1]] }]')])
    result = cli("edit", "--config", str(cfg), "--dry-run", str(sc))
    out = result.stdout
    assert result.returncode == 1, out  # one destination would not get it
    assert "NOT RELAYABLE to plain (burned-in): BurnedInAnnotation is absent on this " \
        "Secondary Capture object (Modality OT)" in out
    assert "  -> redacts, with its own rules: deidentify basic; redact Modality = 'OT', " \
        "Columns = 3: [0, 0, 3, 1]" in out
    assert "       PixelData: '(as received)' -> 'blanked [0, 0, 3, 1] in 1 frame(s) of 3x3'" \
        in out
    assert "       BurnedInAnnotation: (absent) -> 'NO'" in out

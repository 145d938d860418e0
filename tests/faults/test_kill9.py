"""The relay killed with SIGKILL at random moments, 20 times, during a 300-instance transfer,
and restarted each time: every instance is delivered, none is left behind, and duplicates
(at-least-once delivery) are counted and reported."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dicomdata import ct_series
from peers import (
    DCMTK_BIN,
    EG_RULE,
    ENGINES,
    RelayProcess,
    ScriptedSCP,
    dcmtk_env,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)
from relay.send.results import Outcome
from relay.toolkits.dcmtk import parse_dcmsend_report

pytestmark = pytest.mark.e2e

KILLS = 20
INSTANCES = 300


def _modality_round(files: list[Path], port: int, report: Path) -> set[Path]:
    """One dcmsend run, like a modality's; returns the files the relay confirmed."""
    report.unlink(missing_ok=True)
    argv = [str(DCMTK_BIN / "dcmsend"), "-aec", "DICOMRELAY", "--no-halt", "--timeout", "5",
            "--create-report-file", str(report), "127.0.0.1", str(port), *map(str, files)]
    subprocess.run(argv, capture_output=True, env=dcmtk_env(), timeout=300, check=False)
    if not report.exists():
        return set()
    return {Path(name) for name, answer in parse_dcmsend_report(
        report.read_text()).items() if answer.outcome is Outcome.DELIVERED}


@pytest.mark.parametrize("engine", ENGINES)
def test_kill_9_twenty_times_loses_nothing(tmp_path: Path, dcmtk: Path, engine: str) -> None:
    rng = random.Random(20261126)
    sink = ScriptedSCP()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("sink", "SCRIPTED", sink.port)], rules=EG_RULE)
    uids = ct_series(tmp_path / "ct", INSTANCES, ethnic_group="KILLED")
    pending = sorted((tmp_path / "ct").iterdir())
    relay = RelayProcess(cfg, tmp_path).start(port)
    kills = 0
    deadline = time.monotonic() + 600
    try:
        while (pending or kills < KILLS) and time.monotonic() < deadline:
            # The modality sends what is not confirmed yet, in the background...
            report = tmp_path / "report.txt"
            result: dict[str, set[Path]] = {}

            def send(files: list[Path] = pending, out: dict[str, set[Path]] = result,
                     rep: Path = report) -> None:
                out["ok"] = _modality_round(files, port, rep)

            thread = threading.Thread(target=send)
            thread.start()
            # ...while the relay is killed at a random moment (receiving, editing, sending).
            if kills < KILLS:
                time.sleep(rng.uniform(0.05, 1.5))
                assert relay.proc is not None
                os.kill(relay.proc.pid, signal.SIGKILL)
                relay.proc.wait()
                kills += 1
            thread.join(timeout=300)
            confirmed = result.get("ok", set())
            pending = [f for f in pending if f not in confirmed]
            # Restarted at once, as systemd's Restart= would.
            if relay.proc is not None and relay.proc.poll() is not None:
                wait_until(lambda: _port_free(port), 30, what="the port released")
                relay = RelayProcess(cfg, tmp_path).start(port)
        assert not pending, f"{len(pending)} never confirmed to the modality"
        assert kills == KILLS
        wait_until(lambda: set(sink.counts()) >= set(uids), 300, interval=0.5,
                   what="every instance at the sink")
        wait_until(lambda: not spool_files(spool, "out") and not spool_files(spool, "incoming")
                   and not spool_files(spool, "work"), 60, what="nothing left in the spool")
        # Only half-received objects may be quarantined: the modality never got a success for
        # them and sent them again (every UID reached the sink, checked below).
        failed = [p for p in spool_files(spool, "failed") if p.suffix != ".json"]
        assert {p.parent.name for p in failed} <= {"incomplete-receive"}
        counts = sink.counts()
        assert set(counts) == set(uids)
        # Every copy that reached the sink, duplicates included, went through the rule: no
        # recovery path (a restart's sweep, a half-sent batch) forwards an unedited original.
        unedited = [(uid, pid) for uid, pid in sink.every_patient_id if pid != "KILLED"]
        assert not unedited, f"{len(unedited)} arrivals without the rule: {unedited[:3]}"
        duplicates = sum(n - 1 for n in counts.values())
        # The figure for the README's Guarantees (shown with `tests/run -s -k kill_9`).
        print(f"\nkill -9 x{kills} during {INSTANCES} instances ({engine}): "
              f"{len(counts)}/{INSTANCES} delivered, {duplicates} duplicates, "
              f"{len(failed)} half-received objects quarantined")
    finally:
        relay.stop()
        sink.close()


def _port_free(port: int) -> bool:
    from relay.receive.supervisor import port_in_use

    return not port_in_use("127.0.0.1", port)

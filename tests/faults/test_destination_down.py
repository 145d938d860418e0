"""The destination down before and during a 300-instance study, back after a while: all
delivered, none deleted before its destination confirmed it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import ct_series
from peers import (
    ENGINES,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    dcmsend_statuses,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)

pytestmark = pytest.mark.e2e


def _uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
               .SOPInstanceUID)


@pytest.mark.parametrize("engine", ENGINES)
def test_destination_down_before_and_during_a_study(tmp_path: Path, dcmtk: Path,
                                                     engine: str) -> None:
    sink_port = free_port()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("sink", "SCRIPTED", sink_port)])
    uids = ct_series(tmp_path / "ct", 300)
    files = sorted((tmp_path / "ct").iterdir())
    relay = RelayProcess(cfg, tmp_path).start(port)
    sink: ScriptedSCP | None = None
    try:
        # Down before: the first half waits in the spool.
        assert dcmsend(files[:150], port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(spool_files(spool, "out/sink")) == 150, 60, what="150 queued")
        # Up: it starts draining; then down again in the middle of it, while the second
        # half arrives.
        sink = ScriptedSCP(port=sink_port)
        wait_until(lambda: len(sink.counts()) >= 30, 60, interval=0.05, what="draining")
        sink.close()  # down: no new associations, the one open is aborted
        first_sink = sink
        results = []
        report = tmp_path / "second-half.txt"
        second = threading.Thread(target=lambda: results.append(
            dcmsend(files[150:], port, "DICOMRELAY", report=report)))
        second.start()
        second.join(timeout=120)
        assert results and results[0].returncode == 0, results
        statuses = dcmsend_statuses(report)
        assert len(statuses) == 150 and all(v.startswith("0x0000") for v in statuses.values())
        wait_until(lambda: relay.output().count("unavailable") >= 2, 30, what="retries")
        wait_until(lambda: not spool_files(spool, "incoming") and not spool_files(spool, "work"),
                   30, what="the second half processed")
        # Nothing deleted unconfirmed: every UID is still queued or was stored by the sink
        # before it went down (the UIDs themselves: a duplicate cannot stand in for a loss).
        queued = {_uid(p) for p in spool_files(spool, "out/sink")}
        delivered_before_outage = set(first_sink.counts())
        assert queued | delivered_before_outage == set(uids), (
            sorted(set(uids) - queued - delivered_before_outage)[:5],
            {f: len(spool_files(spool, f)) for f in ("incoming", "work", "out", "failed")},
            relay.output()[-3000:])
        # Back after a while: everything arrives, the spool empties.
        sink = ScriptedSCP(port=sink_port)
        wait_until(lambda: set(sink.counts()) | delivered_before_outage == set(uids), 120,
                   interval=0.2, what="all 300 delivered")
        wait_until(lambda: not spool_files(spool, "out"), 30, what="spool empty")
    finally:
        relay.stop()
        if sink is not None:
            sink.close()

"""The destination down before and during a 300-instance study, back after a while: all
delivered, none deleted before its destination confirmed it."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dicomdata import ct_series
from peers import (
    ENGINES,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)

pytestmark = pytest.mark.e2e


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
        second = threading.Thread(target=lambda: results.append(
            dcmsend(files[150:], port, "DICOMRELAY")))
        second.start()
        second.join(timeout=120)
        assert results and results[0].returncode == 0, results
        wait_until(lambda: relay.output().count("unavailable") >= 2, 30, what="retries")
        wait_until(lambda: not spool_files(spool, "incoming") and not spool_files(spool, "work"),
                   30, what="the second half processed")
        queued = len(spool_files(spool, "out/sink"))
        delivered_before_outage = set(first_sink.counts())
        assert queued + len(delivered_before_outage) >= 300, (
            "nothing deleted unconfirmed", {f: len(spool_files(spool, f)) for f in
                                            ("incoming", "work", "out", "failed")},
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

"""Prometheus metrics: scraped over HTTP from `dicom-relay run` while a real study goes from
DCMTK's dcmsend through the relay to Orthanc (down, then up), and after a restart; `status`
prints the same figures. Unit parts: the spool figures, the connection count, the config key,
and the Grafana dashboard's queries against the metric names the relay really exposes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicomdata import ct_series
from peers import (
    ENGINES,
    Orthanc,
    RelayProcess,
    dcmsend,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)
from relay.config.load import load_config
from relay.config.model import ConfigError
from relay.ops.metrics import Metrics, RelayState, open_connections, scrape, spool_figures
from relay.spool import Spool

DASHBOARD = Path(__file__).parent.parent / "templates" / "grafana-dashboard.json"


def _value(samples: dict, name: str, **labels: str) -> float:
    """Sum of a sample's values over the series matching `labels` (0 when none)."""
    return sum(value for got, value in samples.get(name, [])
               if all(got.get(k) == v for k, v in labels.items()))


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ENGINES)
def test_metrics_follow_a_study_through_an_outage_and_a_restart(
        tmp_path: Path, dcmtk: Path, engine: str) -> None:
    pacs = Orthanc(tmp_path / "pacs")  # down at first
    port, metrics_port = free_port(), free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("central", pacs.aet, pacs.dicom_port)],
                       extra=f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    listen = ("127.0.0.1", metrics_port)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        wait_until(lambda: _scrapes(listen), 20, what="/metrics answering")
        first = scrape(listen)
        assert _value(first, "dicom_relay_build_info", engine=engine) == 1
        assert _value(first, "dicom_relay_queued_objects", destination="central") == 0

        ct_series(tmp_path / "ct", 12)
        files = sorted((tmp_path / "ct").iterdir())
        assert dcmsend(files, port, "DICOMRELAY", calling_aet="CT01").returncode == 0
        wait_until(lambda: _value(scrape(listen), "dicom_relay_queued_objects",
                                  destination="central") == 12, 30, what="12 queued")
        wait_until(lambda: _value(scrape(listen), "dicom_relay_retried_objects_total",
                                  destination="central", reason="unavailable") >= 12, 30,
                   what="retries counted while the PACS is down")
        during = scrape(listen)
        assert _value(during, "dicom_relay_received_objects_total", calling_ae="CT01") == 12
        # What the receiver stored (its own file meta), about what dcmsend read from disk.
        assert _value(during, "dicom_relay_received_bytes_total", calling_ae="CT01") > sum(
            f.stat().st_size for f in files) * 0.9
        assert _value(during, "dicom_relay_queue_oldest_age_seconds",
                      destination="central") > 0
        assert _value(during, "dicom_relay_delivered_objects_total") == 0
        # An association held open is counted, whichever process receives.
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRELAY")
        assert assoc.is_established
        try:
            assert _value(scrape(listen), "dicom_relay_associations_open") >= 1
        finally:
            assoc.release()
        status = _status(cfg)
        assert "central" in status and " 12 " in status, status

        pacs.start()
        wait_until(lambda: _value(scrape(listen), "dicom_relay_queued_objects",
                                  destination="central") == 0, 60, what="queue back to 0")
        after = scrape(listen)
        assert pacs.count() == 12
        assert _value(after, "dicom_relay_delivered_objects_total",
                      destination="central") == pacs.count()
        assert _value(after, "dicom_relay_delivery_latency_seconds_count",
                      destination="central") == 12
        assert _value(after, "dicom_relay_delivery_latency_seconds_sum",
                      destination="central") > 0
        assert _value(after, "dicom_relay_failed_objects_total") == 0
        assert _value(after, "dicom_relay_queue_oldest_age_seconds", destination="central") == 0
        assert _value(after, "dicom_relay_receiver_restarts_total") == 0
        status = _status(cfg)
        assert "delivered" in status and "CT01 12" in status, status

        # A backlog left by a stopped relay: right from the first scrape after the restart.
        pacs.stop()
        ct_series(tmp_path / "more", 5)
        assert dcmsend(sorted((tmp_path / "more").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(spool_files(spool, "out/central")) == 5, 30, what="5 queued")
    finally:
        assert relay.stop() == 0
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        wait_until(lambda: _scrapes(listen), 20, what="/metrics after the restart")
        restarted = scrape(listen)
        assert _value(restarted, "dicom_relay_queued_objects", destination="central") == 5
        assert _value(restarted, "dicom_relay_delivered_objects_total") == 0  # counters reset
        pacs.start()
        wait_until(lambda: pacs.count() == 17, 60, what="backlog delivered")
        wait_until(lambda: _value(scrape(listen), "dicom_relay_delivered_objects_total",
                                  destination="central") == 5, 20, what="5 counted")
    finally:
        assert relay.stop() == 0
        pacs.close()
    assert "metrics at http://127.0.0.1:" in relay.output()


def _scrapes(listen: tuple[str, int]) -> bool:
    try:
        scrape(listen, timeout=1)
    except OSError:
        return False
    return True


def _status(cfg: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "relay", "status", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_spool_figures_count_what_is_on_disk(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["central", "backup"]).create()
    for name, mtime in (("a.dcm", 1000.0), ("b.dcm", 1500.0)):
        path = spool.outbox("central") / name
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    (spool.outbox("central") / ".c.dcm.part").write_bytes(b"half")  # not an object yet
    removed = spool.out / "old-pacs"  # a destination taken out of the config
    removed.mkdir()
    (removed / "d.dcm").write_bytes(b"x")
    (spool.failed / "not-dicom").mkdir()
    (spool.failed / "not-dicom" / "e.txt").write_bytes(b"x")
    (spool.failed / "not-dicom" / "e.txt.json").write_text("{}")
    queues, folders, quarantined = spool_figures(spool, ["central", "backup"], now=2000.0)
    by_name = {q.destination: q for q in queues}
    assert (by_name["central"].objects, by_name["central"].oldest_age) == (2, 1000.0)
    assert (by_name["backup"].objects, by_name["backup"].oldest_age) == (0, 0.0)
    assert by_name["old-pacs"].objects == 1 and not by_name["old-pacs"].configured
    assert by_name["central"].configured
    assert quarantined == {"not-dicom": 1} and folders["failed"] == 1


def test_open_connections_reads_established_sockets_on_the_port(tmp_path: Path) -> None:
    header = "  sl  local_address rem_address   st tx_queue rx_queue\n"
    (tmp_path / "tcp").write_text(
        header
        + "   0: 0100007F:2B67 00000000:0000 0A 0\n"     # listening on 11111
        + "   1: 0100007F:2B67 0100007F:D431 01 0\n"     # established on 11111
        + "   2: 0100007F:2B67 0100007F:D432 01 0\n"
        + "   3: 0100007F:1F90 0100007F:D433 01 0\n")    # another port
    (tmp_path / "tcp6").write_text(
        header + "   0: 00000000000000000000000001000000:2B67 "
                 "00000000000000000000000001000000:D434 01 0\n")
    assert open_connections(11111, tmp_path) == 3
    assert open_connections(11111, tmp_path / "nowhere") is None


@pytest.mark.parametrize(("value", "expected"), [
    ('"127.0.0.1:9110"', ("127.0.0.1", 9110)),
    ('"[::1]:9110"', ("::1", 9110)),
    ('"0.0.0.0:9110"', ("0.0.0.0", 9110)),  # noqa: S104
])
def test_metrics_listen_is_parsed(tmp_path: Path, value: str, expected: tuple) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f"[metrics]\nlisten = {value}\n")
    assert load_config(cfg).metrics.listen == expected


@pytest.mark.parametrize("value", ['"9110"', '"127.0.0.1:0"', '"127.0.0.1:99999"', "9110",
                                   '"[nothex]:9110"'])
def test_a_bad_metrics_listen_names_the_key(tmp_path: Path, value: str) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f"[metrics]\nlisten = {value}\n")
    with pytest.raises(ConfigError, match=r"relay.toml: metrics.listen: expected"):
        load_config(cfg)


def test_the_grafana_dashboard_queries_metrics_the_relay_exposes(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path, ["central"])
    metrics.watch(lambda: RelayState(spool, ["central"], {"central": 0}, 11112, 0, "x", "y"))
    metrics.received("CT01", 10)
    metrics.delivered("central", 1)
    metrics.retried("central", "unavailable")
    metrics.failed("central", "status-A900")
    metrics.reloaded(True)
    text = generate_latest(metrics.registry).decode()
    # Sample names, and the families that have none yet (no object quarantined, say).
    exposed = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
               if line and not line.startswith("#")}
    exposed |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 8
    used = {name for expr in exprs for name in re.findall(r"\bdicom_relay_[a-z_]+", expr)}
    assert used - exposed == set(), "the dashboard queries metrics the relay does not expose"
    for needed in ("dicom_relay_queued_objects", "dicom_relay_delivered_objects_total",
                   "dicom_relay_delivery_latency_seconds_bucket",
                   "dicom_relay_failed_objects_total", "dicom_relay_held_studies",
                   "dicom_relay_associations_open", "dicom_relay_receiver_restarts_total",
                   "dicom_relay_spool_free_bytes", "dicom_relay_spool_free_floor_bytes"):
        assert needed in used, needed

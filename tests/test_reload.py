"""SIGHUP reloads the config of a running relay, on every engine, with real peers: a
pynetdicom modality that holds one association open across the reload, DCMTK's dcmsend,
Orthancs as destinations. In the middle of that association, with objects in hand (queued for
a destination that is down, another modality's being received), a destination is changed,
one is added with a filter and the rule changes: nothing is lost, the association goes on,
the objects after the reload follow the new setup. A config that does not validate is
refused; receiver settings wait for a restart; a destination removed keeps its queue in the
spool."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from dicomdata import ct_series
from peers import (
    ENGINES,
    Orthanc,
    RelayProcess,
    dcmsend,
    dcmsend_statuses,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)

pytestmark = pytest.mark.e2e

RULE_V1 = '[[rules]]\nset = "PatientID"\ncopy_from = "EthnicGroup"\n'
RULE_V2 = '[[rules]]\nset = "PatientID"\nvalue = "RELOADED"\n'


def _config(path: Path, port: int, spool: Path, engine: str, dests: list[Orthanc],
            rules: str, extra_dest: str = "", receiver: str = "", main_dest: str = "") -> Path:
    return relay_config(path, port=port, spool=spool, engine=engine, rules=rules,
                        receiver=receiver,
                        destinations=[(p.aet.lower(), p.aet, p.dicom_port,
                                       extra_dest if i else main_dest)
                                      for i, p in enumerate(dests)])


def _hup(relay: RelayProcess) -> None:
    assert relay.proc is not None
    relay.proc.send_signal(signal.SIGHUP)


@pytest.mark.parametrize("engine", ENGINES)
def test_reload_mid_stream_changes_route_and_rule_and_loses_nothing(
        tmp_path: Path, dcmtk: Path, engine: str) -> None:
    # MAIN is down at first: the reload meets objects in hand (queued for MAIN, in its
    # sender's retry, and a second modality's objects being received and edited).
    main = Orthanc(tmp_path / "main", aet="MAIN")
    extra = Orthanc(tmp_path / "extra", aet="EXTRA").start()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = tmp_path / "relay.toml"
    _config(cfg, port, spool, engine, [main], RULE_V1)
    relay = RelayProcess(cfg, tmp_path).start(port)
    before = ct_series(tmp_path / "before", 20, ethnic_group="EG-OLD")
    during = ct_series(tmp_path / "during", 20, ethnic_group="EG-OLD")
    after = ct_series(tmp_path / "after", 20, ethnic_group="EG-OLD")
    # The modality: one association, held open across the reload (pynetdicom, scripted).
    ae = AE(ae_title="CT01")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRELAY")
    other: dict[str, subprocess.CompletedProcess[str]] = {}
    report = tmp_path / "during-report.txt"
    try:
        assert assoc.is_established
        for path in sorted((tmp_path / "before").iterdir()):
            assert assoc.send_c_store(path).Status == 0
        wait_until(lambda: len(spool_files(spool, "out/main")) == 20, 60,
                   what="the first 20 queued for MAIN (down)")
        # v2: MAIN's table changes (its sender is replaced, with 20 objects in hand), a second
        # destination takes only CT from CT01, and another rule.
        _config(cfg, port, spool, engine, [main, extra], RULE_V2,
                main_dest='transcode = "on-refusal"',
                extra_dest='[destinations.filter]\nModality = "CT"\ncalling_ae = "CT01"\n')
        # A second modality sends while the reload happens.
        modality = threading.Thread(target=lambda: other.update(sent=dcmsend(
            sorted((tmp_path / "during").iterdir()), port, "DICOMRELAY", report=report)))
        modality.start()
        wait_until(lambda: len(spool_files(spool, "out/main")) > 20
                   or len(spool_files(spool, "incoming")) + len(spool_files(spool, "work")) > 0,
                   60, interval=0.01, what="the second modality's objects arriving")
        _hup(relay)
        wait_until(lambda: "reload: " in relay.output() and " applied" in relay.output(), 30,
                   what="the reload applied")
        assert assoc.is_established, "the modality's association went on"
        modality.join(timeout=120)
        statuses = dcmsend_statuses(report)
        assert len(statuses) == 20 and all(s.startswith("0x0000") for s in statuses.values())
        main.start()
        for path in sorted((tmp_path / "after").iterdir()):
            assert assoc.send_c_store(path).Status == 0
        assoc.release()
        wait_until(lambda: main.count() == 60 and extra.count() == 20, 90,
                   what="60 at MAIN, the 20 sent on CT01's association after the reload "
                        "at EXTRA")
        tags = main.tags_by_sop_uid()
        assert set(tags) == set(before) | set(during) | set(after)
        assert {tags[uid]["PatientID"] for uid in before} == {"EG-OLD"}
        # Received across the reload: either setup's rule, never none.
        assert {tags[uid]["PatientID"] for uid in during} <= {"EG-OLD", "RELOADED"}
        assert {tags[uid]["PatientID"] for uid in after} == {"RELOADED"}
        extra_tags = extra.tags_by_sop_uid()
        assert set(extra_tags) == set(after)
        assert {t["PatientID"] for t in extra_tags.values()} == {"RELOADED"}
        wait_until(lambda: not spool_files(spool, "out") and not spool_files(spool, "incoming"),
                   30, what="spool drained")
        assert spool_files(spool, "failed") == []
        out = relay.output()
        assert "reload: destination extra added" in out
        assert "reload: destination main changed" in out
    finally:
        if assoc.is_established:
            assoc.abort()
        assert relay.stop() == 0
        main.close()
        extra.close()


def test_reload_refuses_a_bad_config_keeps_restart_settings_and_removed_queues(
        tmp_path: Path, dcmtk: Path) -> None:
    main = Orthanc(tmp_path / "main", aet="MAIN").start()
    extra = Orthanc(tmp_path / "extra", aet="EXTRA")  # down: objects queue for it
    port = free_port()
    spool = tmp_path / "spool"
    cfg = tmp_path / "relay.toml"
    _config(cfg, port, spool, "embedded", [main, extra], RULE_V1)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        ct_series(tmp_path / "a", 4, ethnic_group="FIRST")
        assert dcmsend(sorted((tmp_path / "a").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: main.count() == 4 and len(spool_files(spool, "out/extra")) == 4,
                   30, what="4 delivered to MAIN, 4 queued for EXTRA")

        good = cfg.read_text()
        cfg.write_text(good.replace('copy_from = "EthnicGroup"', 'copy_from = "NoSuchKeyword"'))
        _hup(relay)
        wait_until(lambda: "reload refused" in relay.output(), 20, what="refused")
        assert "NoSuchKeyword" in relay.output()
        ct_series(tmp_path / "b", 3, ethnic_group="SECOND")
        assert dcmsend(sorted((tmp_path / "b").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: main.count() == 7, 30, what="the running config still relays")
        assert {t["PatientID"] for t in main.tags_by_sop_uid().values()} == {"FIRST", "SECOND"}

        # The receiver's port needs a restart (kept); EXTRA is removed (its queue stays).
        new_port = free_port()
        _config(cfg, new_port, spool, "embedded", [main], RULE_V1)
        _hup(relay)
        wait_until(lambda: "destination extra removed" in relay.output(), 20, what="applied")
        out = relay.output()
        assert f"[receiver].port changed ({port} -> {new_port}): it needs a restart" in out
        assert "7 object(s) queued for it stay in out/extra/" in out
        ct_series(tmp_path / "c", 2, ethnic_group="THIRD")
        assert dcmsend(sorted((tmp_path / "c").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: main.count() == 9, 30, what="still on the old port")
        assert len(spool_files(spool, "out/extra")) == 7, "never deleted, not sent anywhere"
        status = subprocess.run([sys.executable, "-m", "relay", "status", "--config", str(cfg)],
                                capture_output=True, text=True, timeout=60, check=True).stdout
        assert "no longer in the config" in status and "extra" in status
    finally:
        assert relay.stop() == 0
        main.stop()
    # Put back, it is sent.
    extra.start()
    _config(cfg, port, spool, "embedded", [main, extra], RULE_V1)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        wait_until(lambda: extra.count() == 7, 60, what="EXTRA's queue sent once it is back")
    finally:
        assert relay.stop() == 0
        main.close()
        extra.close()

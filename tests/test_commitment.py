"""Storage commitment through the relay ([commitment], relay.services.commitment), against
real peers: dcm4che's stgcmtscu (the shared toolkit) as the modality, Orthanc (its own storage
commitment SCP) as the destination with `commitment = true`, a DCMTK storescp as one without,
dcmsend as the modality's C-STORE. pynetdicom only where a scriptable peer is needed: a
modality whose port opens late, one that holds a report unanswered while it releases, one
that asks again before it answers a report.

A report is committed only once every destination has the instance (Orthanc: once Orthanc
itself committed it); quarantined and never-sent instances come back failed with their
reasons; the transaction survives kill -9.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_ACTION
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import StorageCommitmentPushModel, StorageCommitmentPushModelInstance

from dicomdata import ct_series
from peers import (
    DCM4CHE_HOME,
    ENGINES,
    NO_DCM4CHE,
    DcmtkStoreSCP,
    Orthanc,
    RelayProcess,
    dcm4che_env,
    dcmsend,
    free_port,
    relay_config,
    spool_files,
    wait_for_port,
    wait_until,
)
from relay.ops.metrics import scrape

pytestmark = pytest.mark.skipif(DCM4CHE_HOME is None, reason="stgcmtscu plays the modality: "
                                + NO_DCM4CHE)
MODALITY = "CT01"
RELAY_AET = "DICOMRELAY"


@dataclass
class Setup:
    pacs: Orthanc
    sink: DcmtkStoreSCP
    workdir: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("commitment")
    pacs = Orthanc(workdir / "orthanc").start()
    sink = DcmtkStoreSCP(workdir / "sink", "SINK")
    yield Setup(pacs, sink, workdir)
    sink.close()
    pacs.close()


@dataclass
class Relay:
    process: RelayProcess
    port: int
    commitment_port: int
    spool: Path
    config: Path

    def audit(self, step: str) -> list[dict[str, Any]]:
        path = self.spool / "audit.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e for e in map(json.loads, lines) if e["step"] == step]


def start_relay(setup: Setup, name: str, *, engine: str = "embedded", modality_port: int,
                timeout: float = 60, rules: str = "", extra: str = "") -> Relay:
    workdir = setup.workdir / name
    workdir.mkdir()
    port, commitment_port = free_port(), free_port()
    spool = workdir / "spool"
    # Orthanc answers storage commitment only to a peer it knows, and reports to it there
    # (to the first entry of that AE title: one entry, replaced by each test's relay).
    setup.pacs.add_modality("relay", RELAY_AET, commitment_port)
    config = relay_config(
        workdir / "relay.toml", port=port, spool=spool, engine=engine, rules=rules,
        receiver=f'ae_title = "{RELAY_AET}"',
        destinations=[("central", setup.pacs.aet, setup.pacs.dicom_port, "commitment = true"),
                      ("archive", "SINK", setup.sink.port)],
        extra=f"""{extra}
[commitment]
port = {commitment_port}
timeout = {timeout}

[[modalities]]
ae_title = "{MODALITY}"
host = "127.0.0.1"
port = {modality_port}
""")
    process = RelayProcess(config, workdir).start(port)
    wait_for_port(commitment_port, 60, process.proc)
    return Relay(process, port, commitment_port, spool, config)


def stgcmtscu(port: int, files: list[Path], results: Path, *, keep_alive: bool = False,
              listen: int | None = None) -> subprocess.Popen[str]:
    """dcm4che's stgcmtscu as the modality: asks for commitment of `files`, then waits for the
    report (with no timeout of its own: the caller bounds it) and stores it in `results`."""
    assert DCM4CHE_HOME is not None
    results.mkdir(parents=True, exist_ok=True)
    bind = f"{MODALITY}:{listen}" if listen else MODALITY
    argv = [str(DCM4CHE_HOME / "bin" / "stgcmtscu"), "-c", f"{RELAY_AET}@127.0.0.1:{port}",
            "-b", bind, "--directory", str(results), *(["--keep-alive"] if keep_alive else []),
            *map(str, files)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dcm4che_env())


def report_in(results: Path) -> Dataset | None:
    found = sorted(results.iterdir())
    return dcmread(found[0]) if found else None


def committed(report: Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])}


def failed(report: Dataset) -> dict[str, int]:
    return {str(i.ReferencedSOPInstanceUID): int(i.FailureReason)
            for i in report.get("FailedSOPSequence", [])}


def finish(proc: subprocess.Popen[str], timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"stgcmtscu got no report in {timeout} s:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_a_study_is_committed_once_every_destination_has_it(setup: Setup, engine: str
                                                            ) -> None:
    study = setup.workdir / f"study-{engine}"
    uids = set(ct_series(study, 10))
    files = sorted(study.iterdir())
    modality_port = free_port()
    relay = start_relay(setup, f"relay-{engine}", engine=engine, modality_port=modality_port)
    try:
        assert dcmsend(files, relay.port, RELAY_AET, MODALITY).returncode == 0
        # On the request's own association (the modality keeps it open for the report).
        results = setup.workdir / f"results-{engine}"
        proc = stgcmtscu(relay.commitment_port, files, results, keep_alive=True)
        finish(proc, 90)
        report = report_in(results)
        assert report is not None
        assert committed(report) == uids and not failed(report)
        # True: both destinations have every instance, and Orthanc itself committed them.
        assert uids <= set(setup.pacs.tags_by_sop_uid())
        assert uids <= setup.sink.sop_uids()
        jobs = setup.pacs.rest("/jobs?expand")
        assert any(j["Type"] == "StorageCommitmentScp" for j in jobs), jobs
        [reported] = wait_until(lambda: relay.audit("commitment-reported"), 10,
                                what="the report on record")
        assert reported["committed"] == 10 and reported["failed"] == 0
        assert "request's association" in reported["via"]
        # A modality that lets go of its association and listens on a port of its own (its
        # [[modalities]] entry): the report comes on a new association.
        own_port = setup.workdir / f"results-own-port-{engine}"
        finish(stgcmtscu(relay.commitment_port, files, own_port, listen=modality_port), 90)
        report = report_in(own_port)
        assert report is not None and committed(report) == uids and not failed(report)
        reports = wait_until(lambda: len(relay.audit("commitment-reported")) == 2 and
                             relay.audit("commitment-reported"), 10, what="both on record")
        assert f"new association to {MODALITY}@127.0.0.1:{modality_port}" in reports[1]["via"]
        if engine == "embedded":
            # The embedded engine answers on [receiver].port too (in its receiver process).
            again = setup.workdir / "results-receiver-port"
            finish(stgcmtscu(relay.port, files, again, keep_alive=True), 90)
            report = report_in(again)
            assert report is not None and committed(report) == uids and not failed(report)
    finally:
        relay.process.stop()


def test_a_report_waits_for_a_pacs_that_is_down_and_survives_a_kill_9(setup: Setup) -> None:
    """Orthanc down: the modality's request is answered, its report is not (nothing is
    committed that the PACS does not have). The relay is killed with SIGKILL before it can
    report; after its restart and Orthanc's, the report reaches the modality's own port on a
    new association (stgcmtscu let go of the request's)."""
    study = setup.workdir / "study-down"
    uids = set(ct_series(study, 5))
    files = sorted(study.iterdir())
    modality_port = free_port()
    relay = start_relay(setup, "relay-down", modality_port=modality_port)
    setup.pacs.stop()
    proc = None
    try:
        assert dcmsend(files, relay.port, RELAY_AET, MODALITY).returncode == 0
        results = setup.workdir / "results-down"
        proc = stgcmtscu(relay.commitment_port, files, results, listen=modality_port)
        wait_until(lambda: relay.audit("commitment-requested"), 30, what="the request taken")
        # The archive has them all; the PACS cannot: no report while it is down.
        wait_until(lambda: uids <= setup.sink.sop_uids(), 30, what="the archive has them")
        time.sleep(2)
        assert report_in(results) is None and not relay.audit("commitment-reported")
        status = subprocess.run([sys.executable, "-m", "relay", "status", "--config",
                                 str(relay.config)], capture_output=True, text=True, timeout=60,
                                check=True).stdout
        assert "storage commitment: 1 transaction(s) waiting for their report" in status
        assert f"from {MODALITY} (127.0.0.1): 5 instance(s)" in status
        relay.process.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        relay.process.proc.wait()  # type: ignore[union-attr]
        setup.pacs.start()
        setup.pacs.add_modality("relay", RELAY_AET, relay.commitment_port)
        relay.process.start(relay.port)
        finish(proc, 90)
        report = report_in(results)
        assert report is not None and committed(report) == uids and not failed(report)
        assert uids <= set(setup.pacs.tags_by_sop_uid())
        [reported] = wait_until(lambda: relay.audit("commitment-reported"), 10,
                                what="the report on record")
        assert f"new association to {MODALITY}@127.0.0.1:{modality_port}" in reported["via"]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        if setup.pacs.proc is None:
            setup.pacs.start()
        relay.process.stop()


def committed_at_central(relay: Relay) -> int:
    """Instances the ledger has as committed by Orthanc (the relay's own request to it)."""
    db = sqlite3.connect(relay.spool / "commitment.sqlite")
    try:
        return int(db.execute("SELECT count(*) FROM confirmations WHERE destination = "
                              "'central' AND state = 'committed'").fetchone()[0])
    finally:
        db.close()


class LateModality:
    """A modality whose port opens only later (pynetdicom: a scriptable peer), recording the
    reports it gets."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reports: list[Dataset] = []
        self.server: Any = None

    def open(self) -> None:
        ae = AE(ae_title=MODALITY)
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)

        def on_report(event: evt.Event) -> tuple[int, None]:
            self.reports.append(event.event_information)
            return 0x0000, None

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def test_quarantined_and_never_sent_instances_are_reported_failed(setup: Setup) -> None:
    """One instance quarantined (its rule's source attribute missing), one never sent: at
    [commitment].timeout the report says so (0110 processing failure, 0112 no such object
    instance) and commits the rest. The modality's port is closed when the report is due; it
    is delivered once the port opens."""
    study = setup.workdir / "study-failed"
    uids = ct_series(study, 6)
    files = sorted(study.iterdir())
    broken = dcmread(files[0])
    del broken.EthnicGroup
    broken.save_as(files[0])
    modality = LateModality(free_port())
    rules = ('[[rules]]\nset = "PatientID"\ncopy_from = "EthnicGroup"\n'
             'on_missing = "fail"\n')
    listen = free_port()
    relay = start_relay(setup, "relay-failed", modality_port=modality.port, timeout=4,
                        rules=rules, extra=f'[metrics]\nlisten = "127.0.0.1:{listen}"\n')
    try:
        assert dcmsend(files[:-1], relay.port, RELAY_AET, MODALITY).returncode == 0
        # Asked once Orthanc committed the four it got (its jobs take their time): the
        # deadline then only decides the instance that never came.
        wait_until(lambda: committed_at_central(relay) == 4, 60,
                   what="Orthanc's commitment of the four it got")
        results = setup.workdir / "results-failed"
        # Without a port of its own nor --keep-alive, stgcmtscu lets go of the association
        # after the N-ACTION-RSP and waits for ever: the modality that went away.
        proc = stgcmtscu(relay.commitment_port, files, results)
        wait_until(lambda: relay.audit("commitment-requested"), 30, what="the request taken")
        proc.kill()
        proc.communicate()
        wait_until(lambda: relay.audit("commitment-deferred"), 30,
                   what="a report that could not be delivered yet")
        modality.open()
        wait_until(lambda: modality.reports, 30, what="the report, once the port opened")
        [report] = modality.reports
        assert failed(report) == {uids[0]: 0x0110, uids[-1]: 0x0112}
        assert committed(report) == set(uids[1:-1])
        [reported] = wait_until(lambda: relay.audit("commitment-reported"), 10,
                                what="the report on record")
        assert reported["committed"] == 4 and reported["failed"] == 2
        assert any("missing-source" in f for f in reported["failures"])
        samples = scrape(("127.0.0.1", listen))
        assert samples["dicom_relay_commitment_pending_transactions"][0][1] == 0
        assert samples["dicom_relay_commitment_committed_instances_total"][0][1] == 4
        assert samples["dicom_relay_commitment_failed_instances_total"][0][1] == 2
        assert spool_files(relay.spool, "failed")
    finally:
        modality.close()
        relay.process.stop()


def test_dcm4che_modality_stores_and_asks_on_the_receiver_port(setup: Setup) -> None:
    """dcm4che's `modality` tool, as a modality's whole work-flow: C-STORE, then Storage
    Commitment, both to the embedded engine's [receiver].port; the report comes to its own
    port once Orthanc committed the study."""
    assert DCM4CHE_HOME is not None
    study = setup.workdir / "study-modality"
    uids = set(ct_series(study, 5))
    modality_port = free_port()
    relay = start_relay(setup, "relay-modality", modality_port=modality_port)
    # The tool stores the report it receives in its working folder, named by the Transaction UID.
    reports = setup.workdir / "modality-reports"
    reports.mkdir()
    try:
        proc = subprocess.Popen(
            [str(DCM4CHE_HOME / "bin" / "modality"), "--stgcmt", "-b",
             f"{MODALITY}:{modality_port}", "-c", f"{RELAY_AET}@127.0.0.1:{relay.port}",
             str(study)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dcm4che_env(), cwd=reports)
        out = finish(proc, 90)
        assert "N-EVENT-REPORT" in out, out[-3000:]
        [stored] = list(reports.iterdir())
        report = dcmread(stored, force=True)
        assert {item.ReferencedSOPInstanceUID for item in report.ReferencedSOPSequence} == uids
        assert "FailedSOPSequence" not in report
        [reported] = wait_until(lambda: relay.audit("commitment-reported"), 10,
                                what="the report on record")
        assert reported["committed"] == 5 and reported["failed"] == 0
        assert uids <= set(setup.pacs.tags_by_sop_uid()) and uids <= setup.sink.sop_uids()
    finally:
        relay.process.stop()


def test_a_modality_that_releases_while_its_report_is_on_the_way_gets_it_on_its_port(
        setup: Setup) -> None:
    """The report goes out on the request's association just as the modality lets go of it
    (stgcmtscu with a port of its own releases right after the N-ACTION-RSP, and does not
    answer a report that crosses its A-RELEASE-RQ). The relay must answer the release at once,
    not wait for the report's response with the association's reactor held (the modality
    then aborts after its own timeout), and send the report to the modality's port instead.
    pynetdicom plays the modality, to hold the report unanswered while it releases."""
    study = setup.workdir / "study-crossing"
    uids = set(ct_series(study, 3))
    files = sorted(study.iterdir())
    modality = LateModality(free_port())
    relay = start_relay(setup, "relay-crossing", modality_port=modality.port)
    ae = AE(ae_title=MODALITY)
    ae.acse_timeout = 20  # the wait for the relay's A-RELEASE-RP, then an abort
    ae.add_requested_context(StorageCommitmentPushModel)
    arrived, answer = threading.Event(), threading.Event()

    def on_report(event: evt.Event) -> tuple[int, None]:
        arrived.set()  # held unanswered until the release is over, as stgcmtscu does
        answer.wait(60)
        return 0x0000, None

    assoc = None
    try:
        modality.open()
        assert dcmsend(files, relay.port, RELAY_AET, MODALITY).returncode == 0
        wait_until(lambda: committed_at_central(relay) == len(uids), 60,
                   what="Orthanc's commitment of the study")
        assoc = ae.associate("127.0.0.1", relay.commitment_port, ae_title=RELAY_AET,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
        assert assoc.is_established
        request = _commitment_request(files)
        status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
        assert status.Status == 0x0000
        assert arrived.wait(30), "no report on the request's association"
        assoc.acse.negotiate_release()  # the modality lets go, the report still unanswered
        answer.set()
        assert assoc.is_released and not assoc.is_aborted, "the relay did not answer the release"
        [report] = wait_until(lambda: modality.reports, 30, what="the report on the port")
        assert committed(report) == uids and not failed(report)
        assert report.TransactionUID == request.TransactionUID
        [reported] = wait_until(lambda: relay.audit("commitment-reported"), 10,
                                what="the report on record")
        assert f"new association to {MODALITY}@127.0.0.1:{modality.port}" in reported["via"]
    finally:
        answer.set()
        if assoc is not None and assoc.is_established:
            assoc.abort()
        modality.close()
        relay.process.stop()


def _commitment_request(files: list[Path]) -> Dataset:
    request = Dataset()
    request.TransactionUID = generate_uid()
    request.ReferencedSOPSequence = []
    for ds in map(dcmread, files):
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        request.ReferencedSOPSequence.append(item)
    return request


def test_a_request_that_crosses_a_report_on_a_kept_association_is_answered(
        setup: Setup) -> None:
    """A modality keeps its association and asks again (its next study) while the report
    of its first request is on its way there: its N-ACTION-RQ reaches the relay before its
    answer to the report. pynetdicom's wait for that answer took the request for it: the
    request was never answered nor kept. pynetdicom plays the modality, sending its second
    request from its report handler, before the handler's answer goes out."""
    study = setup.workdir / "study-second-request"
    ct_series(study, 2)
    files = sorted(study.iterdir())
    relay = start_relay(setup, "relay-second-request", modality_port=free_port())
    first, second = _commitment_request(files), _commitment_request(files)
    reports: list[Dataset] = []
    answered: list[int] = []  # the statuses of N-ACTION-RSPs to the second request

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append(event.event_information)
        if len(reports) == 1:
            context = event.assoc._get_valid_context(StorageCommitmentPushModel, "", "scu")
            request = N_ACTION()
            request.MessageID = 2
            request.RequestedSOPClassUID = StorageCommitmentPushModel
            request.RequestedSOPInstanceUID = StorageCommitmentPushModelInstance
            request.ActionTypeID = 1
            request.ActionInformation = BytesIO(encode(second, True, True))
            event.assoc.dimse.send_msg(request, context.context_id)
        return 0x0000, None

    def on_received(event: evt.Event) -> None:
        command = event.message.command_set
        if command.CommandField == 0x8130 and command.MessageIDBeingRespondedTo == 2:
            answered.append(int(command.Status))

    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = None
    try:
        assert dcmsend(files, relay.port, RELAY_AET, MODALITY).returncode == 0
        wait_until(lambda: committed_at_central(relay) == len(files), 60,
                   what="Orthanc's commitment of the study")
        assoc = ae.associate("127.0.0.1", relay.commitment_port, ae_title=RELAY_AET,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report),
                                           (evt.EVT_DIMSE_RECV, on_received)])
        assert assoc.is_established
        status, _ = assoc.send_n_action(first, 1, StorageCommitmentPushModel,
                                        StorageCommitmentPushModelInstance)
        assert status.Status == 0x0000
        wait_until(lambda: len(reports) == 2, 30, what="the second request's report")
        assert answered == [0x0000], "the second request was not answered"
        assert [r.TransactionUID for r in reports] == [first.TransactionUID,
                                                       second.TransactionUID]
        assert all(committed(r) == {str(dcmread(f).SOPInstanceUID) for f in files}
                   for r in reports)
        recorded = wait_until(lambda: len(relay.audit("commitment-reported")) == 2 and
                              relay.audit("commitment-reported"), 10, what="both on record")
        assert all("request's association" in r["via"] for r in recorded)
        assoc.release()
    finally:
        if assoc is not None and assoc.is_established:
            assoc.abort()
        relay.process.stop()

"""Each engine's sender (DCMTK's also over TLS) against a scripted pynetdicom Storage SCP (a
real network peer that answers chosen statuses), and against nothing at all (connection
refused)."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES

from dicomdata import ct_series
from peers import (
    Link,
    ScriptedSCP,
    descendants,
    free_port,
    halted_within,
    send_past_a_poison_object,
    wait_until,
    with_dcm4che,
)
from relay.config.model import SenderConfig
from relay.send.results import DestinationUnavailable, Outcome
from relay.send.sender import DestinationSender
from relay.spool import Spool


@pytest.fixture
def files_in_outbox(tmp_path: Path) -> tuple[Spool, list[Path]]:
    spool = Spool(tmp_path / "spool", ["scp"]).create()
    ct_series(spool.outbox("scp"), 6)  # InstanceNumber 1..6
    return spool, spool.queued("scp")


def test_statuses_from_a_real_peer(files_in_outbox: tuple[Spool, list[Path]],
                                   link: Link) -> None:
    spool, files = files_in_outbox
    scp = link.scp({2: 0xA700, 3: 0xA900, 4: 0xC000, 5: 0xB000})
    try:
        dest = link.destination("SCRIPTED", scp.port)
        sender = DestinationSender(spool, dest, link.engine, SenderConfig(retry_initial=60))
        sender.load_backlog()
        results = sender.send_batch(sender._next_batch())
        by_name = {r.path.name: r for r in results}
        statuses = [by_name[f.name].status for f in files]
        assert statuses == [0x0000, 0xA700, 0xA900, 0xC000, 0xB000, 0x0000]
        assert [by_name[f.name].outcome for f in files] == [
            Outcome.DELIVERED, Outcome.RETRY, Outcome.FAILED, Outcome.FAILED,
            Outcome.DELIVERED, Outcome.DELIVERED]
        assert [p.name for p in spool.queued("scp")] == [files[1].name], "A700 stays queued"
        assert (spool.failed / "status-A900" / f"scp--{files[2].name}").exists()
        assert (spool.failed / "status-C000" / f"scp--{files[3].name}").exists()
        assert len(scp.received) == 3
    finally:
        scp.close()


def test_connection_refused_keeps_everything(files_in_outbox: tuple[Spool, list[Path]],
                                             link: Link) -> None:
    spool, files = files_in_outbox
    dest = link.destination("NOBODY", free_port())
    sender = DestinationSender(spool, dest, link.engine, SenderConfig(timeout=5))
    sender.load_backlog()
    results = sender.send_batch(sender._next_batch())
    assert {r.outcome for r in results} == {Outcome.RETRY}
    assert spool.queued("scp") == files
    assert sender._hold_until > 0


def test_association_rejected_keeps_everything(
        files_in_outbox: tuple[Spool, list[Path]], link: Link) -> None:
    spool, files = files_in_outbox
    ae = AE("PICKY")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2")
    ae.require_calling_aet = ["SOMEONE"]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=link.server_ssl)
    try:
        dest = link.destination("PICKY", port)
        sender = DestinationSender(spool, dest, link.engine, SenderConfig())
        sender.load_backlog()
        results = sender.send_batch(sender._next_batch())
        assert {r.outcome for r in results} == {Outcome.RETRY}
        assert "rejected" in results[0].detail.lower()
        assert spool.queued("scp") == files
    finally:
        server.shutdown()


def test_echo(link: Link) -> None:
    scp = link.scp()
    try:
        link.engine.echo(link.destination("SCRIPTED", scp.port), "ME", 5)
    finally:
        scp.close()
    with pytest.raises(DestinationUnavailable):
        link.engine.echo(link.destination("SCRIPTED", free_port()), "ME", 5)


def test_unacceptable_files_do_not_block_the_queue(tmp_path: Path, link: Link) -> None:
    # A PACS that takes CT only: a batch of nothing but JPEG 2000 secondary captures must go to
    # failed/ with the reason, not be retried forever in front of everything else.
    from dicomdata import bundled, copy_with_new_uids

    spool = Spool(tmp_path / "spool", ["scp"]).create()
    j2k = spool.outbox("scp") / "j2k.dcm"
    copy_with_new_uids(bundled("JPEG2000.dcm"), j2k)
    ae = AE("CTONLY")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.2", ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=link.server_ssl)
    try:
        dest = link.destination("CTONLY", port)
        sender = DestinationSender(spool, dest, link.engine, SenderConfig(timeout=10))
        sender.load_backlog()
        [result] = sender.send_batch(sender._next_batch())
        assert result.outcome is Outcome.FAILED
        assert "presentation context" in result.detail
        assert spool.queued("scp") == []
        assert [p.name for p in spool.failed.rglob("*.dcm")] == ["scp--j2k.dcm"]
    finally:
        server.shutdown()


def test_batches_in_a_row_share_one_association(tmp_path: Path) -> None:
    # The embedded engine keeps the association between batches while work keeps coming,
    # and releases it once none has come for KEEP_OPEN seconds.
    import threading

    from relay.send.sender import KEEP_OPEN
    from relay.toolkits.embedded import EmbeddedEngine

    spool = Spool(tmp_path / "spool", ["scp"]).create()
    uids = ct_series(spool.outbox("scp"), 9)
    link = Link(EmbeddedEngine())
    scp = link.scp()
    sender = DestinationSender(spool, link.destination("SCRIPTED", scp.port), link.engine,
                               SenderConfig(batch_size=3))
    sender.load_backlog()
    worker = threading.Thread(target=sender.run)
    worker.start()
    try:
        wait_until(lambda: set(scp.counts()) == set(uids), 30, what="all delivered")
        assert len(scp._per_assoc) == 1, "three batches, one association"
        assert scp.server is not None
        wait_until(lambda: not scp.server.active_associations, KEEP_OPEN + 10,
                   what="the idle association released")
        # More work later: a new association, released again when the sender stops.
        more = ct_series(spool.outbox("scp"), 2, ethnic_group="LATER")
        sender.load_backlog()
        wait_until(lambda: set(more) <= set(scp.counts()), 30, what="later ones delivered")
        assert len(scp._per_assoc) == 2
    finally:
        sender.stop()
        worker.join(timeout=30)
        scp.close()
    assert spool.queued("scp") == []


class HoldingSCP(ScriptedSCP):
    """Holds its answer to InstanceNumber 3 until released (a PACS slow on one object)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        super().__init__()

    def on_store(self, event: Any) -> int:
        if event.dataset.get("InstanceNumber") == 3:
            self.release.wait(30)
        return super().on_store(event)


@pytest.mark.parametrize("link", ["embedded", "dcmtk", *with_dcm4che("dcm4che")],
                         indirect=True)
def test_each_result_comes_as_its_response_arrives(tmp_path: Path, link: Link) -> None:
    # The sender deletes a confirmed object as its result comes: results that came only when
    # the batch ended (dcmsend's report) made a relay killed mid-batch send all of it again.
    ct_series(tmp_path / "ct", 4)  # InstanceNumber 1..4
    files = sorted((tmp_path / "ct").iterdir())
    scp = HoldingSCP()
    try:
        results = link.engine.send(files, link.destination("SCRIPTED", scp.port), "RELAY", 60)
        first = [next(results), next(results)]
        stored_then = len(scp.received)  # the third's answer is still held
        scp.release.set()
        rest = list(results)
    finally:
        scp.release.set()
        scp.close()
    assert stored_then == 2
    assert [(r.path, r.outcome) for r in first] == [(f, Outcome.DELIVERED) for f in files[:2]]
    assert sorted((r.path, r.outcome) for r in rest) == [
        (f, Outcome.DELIVERED) for f in files[2:]]


@pytest.mark.parametrize("link", ["embedded", "dcmtk", "dcmtk-tls",
                                  *with_dcm4che("dcm4che")], indirect=True)
def test_results_at_the_end_of_the_call_say_what_each_response_said(tmp_path: Path,
                                                                    link: Link) -> None:
    # confirm_each=False (a served C-MOVE's sending): DCMTK's dcmsend then runs without
    # --debug and every result comes from its report; the same statuses, the same outcomes.
    from relay.toolkits.dcmtk import dcmsend_argv

    ct_series(tmp_path / "ct", 6)  # InstanceNumber 1..6
    files = sorted((tmp_path / "ct").iterdir())
    scp = link.scp({2: 0xA700, 3: 0xA900, 4: 0xC000, 5: 0xB000})
    try:
        results = list(link.engine.send(files, link.destination("SCRIPTED", scp.port),
                                        "RELAY", 30, confirm_each=False))
    finally:
        scp.close()
    by_path = {r.path: r for r in results}
    assert len(results) == len(files)
    assert [by_path[f].status for f in files] == [0x0000, 0xA700, 0xA900, 0xC000, 0xB000,
                                                  0x0000]
    assert [by_path[f].outcome for f in files] == [
        Outcome.DELIVERED, Outcome.RETRY, Outcome.FAILED, Outcome.FAILED,
        Outcome.DELIVERED, Outcome.DELIVERED]
    quiet = dcmsend_argv(Path("dcmsend"), files, link.destination("X", 1), "RELAY", 30,
                         tmp_path / "report", each_response=False)
    assert "--verbose" in quiet and "--debug" not in quiet


class DcmsendKillingSCP(ScriptedSCP):
    """A PACS at whose C-STORE of one instance the dcmsend sending it is killed (a crashing
    tool), while that object is on the wire."""

    def __init__(self, victim: str, times: int) -> None:
        super().__init__()
        self.victim, self.times = victim, times

    def on_store(self, event: Any) -> int:
        if str(event.request.AffectedSOPInstanceUID) == self.victim and self.times > 0:
            [pid] = [p for p in descendants(os.getpid())
                     if Path(f"/proc/{p}/comm").read_text().strip() == "dcmsend"]
            self.times -= 1
            os.kill(pid, signal.SIGKILL)
            assert halted_within(pid, 10), f"dcmsend (pid {pid}) did not die"
            return 0xA700  # never read: it is dead
        return super().on_store(event)


def test_a_dcmsend_killed_mid_object_sets_that_object_aside(tmp_path: Path,
                                                           dcmtk: Path) -> None:
    # dcmsend dies (a crash: killed by a signal) with one object on the wire, three times
    # in a row. It leaves no report, but it named that object before sending it: that one
    # is set aside each time and then quarantined, the others are all delivered, and the
    # queue is never held as if the destination were down.
    from relay.toolkits.dcmtk import DcmtkEngine

    run = send_past_a_poison_object(tmp_path, DcmtkEngine(dcmtk),
                                    lambda victim: DcmsendKillingSCP(victim, times=3), 10)
    assert run.sender.pending() == 0
    assert run.received == run.others
    assert run.quarantined == ["pacs--1-ct.dcm"]
    assert "the association broke 3 times" in run.sidecar
    assert "dcmsend killed by signal 9" in run.sidecar
    assert run.sender._down_attempts == 0 and run.pacs.times == 0

"""A destination that drops the connection in the middle of a batch: nothing is deleted that
was not confirmed, and everything arrives once the destination behaves."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from dicomdata import ct_series
from peers import Link, ScriptedSCP
from relay.config.model import SenderConfig
from relay.send.results import Outcome
from relay.send.sender import DestinationSender
from relay.spool import Spool


def test_connection_reset_mid_batch(tmp_path: Path, link: Link) -> None:
    spool = Spool(tmp_path / "spool", ["scp"]).create()
    uids = ct_series(spool.outbox("scp"), 12)
    scp = link.scp(reset_after=5)
    try:
        dest = link.destination("SCRIPTED", scp.port)
        sender = DestinationSender(spool, dest, link.engine, SenderConfig(retry_initial=0.1,
                                                                     retry_max=0.2, timeout=5))
        sender.load_backlog()
        results = sender.send_batch(sender._next_batch())
        delivered = [r for r in results if r.outcome is Outcome.DELIVERED]
        assert len(delivered) == 5, [(r.path.name, r.outcome, r.detail) for r in results]
        assert {r.outcome for r in results} - {Outcome.DELIVERED} == {Outcome.RETRY}
        assert len(spool.queued("scp")) == 7, "only confirmed objects left the spool"
        assert len(scp.received) == 5
        scp.reset_after = None  # the PACS is repaired
        for _ in range(20):
            if not spool.queued("scp"):
                break
            batch = sender._next_batch()
            sender.send_batch(batch)
        assert spool.queued("scp") == []
        assert set(scp.counts()) == set(uids)
    finally:
        scp.close()


class PoisonSCP(ScriptedSCP):
    """Breaks off the association whenever it receives one particular object."""

    poison: str = ""

    def on_store(self, event):  # noqa: ANN001, ANN201
        if str(event.request.AffectedSOPInstanceUID) == self.poison:
            event.assoc.dul.socket.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            event.assoc.dul.socket.socket.close()
            return 0xA700
        return super().on_store(event)


def test_an_object_that_breaks_every_association_is_quarantined(
        tmp_path: Path, link: Link) -> None:
    spool = Spool(tmp_path / "spool", ["scp"]).create()
    uids = ct_series(spool.outbox("scp"), 8)
    scp = PoisonSCP(ssl_context=link.server_ssl)
    scp.poison = uids[0]  # the first in the queue: everything else waits behind it
    try:
        dest = link.destination("SCRIPTED", scp.port)
        sender = DestinationSender(spool, dest, link.engine, SenderConfig(retry_initial=0.05,
                                                                     retry_max=0.1, timeout=5))
        sender.load_backlog()
        for _ in range(30):
            if not spool.queued("scp"):
                break
            sender.send_batch(sender._next_batch())
        assert set(scp.counts()) == set(uids[1:]), "the others were not held behind it"
        [poison] = [p for p in spool.failed.rglob("*.dcm")]
        assert poison.parent.name == "breaks-association"
        assert "the association broke 3 times" in (
            poison.with_name(poison.name + ".json").read_text())
    finally:
        scp.close()

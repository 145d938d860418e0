"""A destination that drops the connection in the middle of a batch: nothing is deleted that
was not confirmed, and everything arrives once the destination behaves."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomdata import ct_series
from peers import ScriptedSCP
from relay.config import Destination, SenderConfig
from relay.send import DestinationSender
from relay.spool import Spool
from relay.toolkits.base import Outcome
from relay.toolkits.dcmtk import DcmtkEngine
from relay.toolkits.embedded import EmbeddedEngine


@pytest.mark.parametrize("engine_name", ["embedded", "dcmtk"])
def test_connection_reset_mid_batch(tmp_path: Path, dcmtk: Path, engine_name: str) -> None:
    engine = EmbeddedEngine() if engine_name == "embedded" else DcmtkEngine(dcmtk)
    spool = Spool(tmp_path / "spool", ["scp"]).create()
    uids = ct_series(spool.outbox("scp"), 12)
    scp = ScriptedSCP(reset_after=5)
    try:
        dest = Destination("scp", "SCRIPTED", "127.0.0.1", scp.port)
        sender = DestinationSender(spool, dest, engine, SenderConfig(retry_initial=0.1,
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

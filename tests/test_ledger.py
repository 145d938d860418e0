"""Storage commitment's ledger and verdict (relay.services.ledger), at unit level: what
"committed" means for each outcome an object can have. The same against real peers is in
test_commitment.py."""

from __future__ import annotations

from pathlib import Path

from relay.events import Delivered, EventBus, Failed, Identity, Received, Requeued, Routed, Unrouted
from relay.services.ledger import Ledger, LedgerWriter, Outcome, verdict
from relay.spool import Spool

CT = "1.2.840.10008.5.1.4.1.1.2"


def routed(*to: str, **confirmations: tuple[str, str]) -> Outcome:
    return Outcome("routed", to, "", dict(confirmations))


def test_committed_only_when_every_destination_confirmed() -> None:
    both = routed("a", "b", a=("delivered", ""))
    assert verdict(CT, "1", [both], frozenset(), expired=False).state == "pending"
    done = routed("a", "b", a=("delivered", ""), b=("delivered", ""))
    assert verdict(CT, "1", [done], frozenset(), expired=False).state == "committed"
    # A destination with commitment = true counts once that PACS committed it.
    assert verdict(CT, "1", [done], frozenset({"b"}), expired=False).state == "pending"
    pacs = routed("a", "b", a=("delivered", ""), b=("committed", ""))
    assert verdict(CT, "1", [pacs], frozenset({"b"}), expired=False).state == "committed"


def test_failures_and_the_deadline() -> None:
    refused = routed("a", a=("failed", "status-A900"))
    v = verdict(CT, "1", [refused], frozenset(), expired=False)
    assert (v.state, v.reason) == ("failed", 0x0110) and "status-A900" in v.why
    quarantined = Outcome("failed", (), "missing-source", {})
    assert verdict(CT, "1", [quarantined], frozenset(), False).why == \
        "quarantined: missing-source"
    assert verdict(CT, "1", [Outcome("unrouted", (), "", {})], frozenset(), False).reason \
        == 0x0110
    # Never received: pending until the deadline, then "no such object instance".
    assert verdict(CT, "1", [], frozenset(), expired=False).state == "pending"
    assert verdict(CT, "1", [], frozenset(), expired=True).reason == 0x0112
    # Still on its way at the deadline: a processing failure, saying why.
    late = verdict(CT, "1", [routed("a")], frozenset(), expired=True)
    assert (late.state, late.reason) == ("failed", 0x0110) and "timeout" in late.why
    # The same instance sent twice: one copy that arrived commits it.
    twice = [quarantined, routed("a", a=("delivered", ""))]
    assert verdict(CT, "1", twice, frozenset(), expired=False).state == "committed"


def test_the_ledger_follows_the_event_stream(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    events = EventBus()
    events.subscribe(LedgerWriter(ledger, Spool(tmp_path)))
    ident = Identity(sop_instance_uid="1.2.3", sop_class_uid=CT)
    events.emit(Received(obj="x.dcm", identity=ident, calling_ae="CT01", size=1, arrived=0,
                         transfer_syntax="1.2.840.10008.1.2.1"))
    events.emit(Routed(obj="x.dcm", to=("a", "b"), not_to={}, refused_by={}))
    events.emit(Delivered(obj="x.dcm", destination="a", identity=ident, status="0x0000"))
    events.emit(Failed(obj="x.dcm", stage="send", reason="status-A900", destination="b"))

    def state() -> str:
        [outcome] = ledger.outcomes(["1.2.3"])["1.2.3"]
        return verdict(CT, "1.2.3", [outcome], frozenset(), False).state

    assert state() == "failed"
    # Requeued from failed/ for b: pending again, then delivered there.
    events.emit(Requeued(obj="x.dcm", reason="status-A900", to="out/b"))
    assert state() == "pending"
    events.emit(Delivered(obj="x.dcm", destination="b", identity=ident, status="0x0000"))
    assert state() == "committed"
    # The relay's own request to a PACS with commitment = true, and that PACS's report.
    assert ledger.to_ask("b") == [("x.dcm", CT, "1.2.3")]
    ledger.asked("b", ["x.dcm"])
    assert ledger.to_ask("b") == []
    assert ledger.committed_by("b", ["1.2.3"], "committed") == 1
    events.emit(Unrouted(obj="y.dcm", why="", why_keys="", kept=True))
    assert ledger.outcomes([""]) != {}  # unreadable: kept, under no UID a request can name
    # Transactions and the figures the metrics read.
    ledger.add_transaction("9.9", "CT01", "127.0.0.1", 60, [(CT, "1.2.3")], owner=None)
    assert [t.uid for t in ledger.transactions()] == ["9.9"]
    ledger.reported("9.9", 1, 0)
    assert ledger.figures() == (0, 1, 0)
    ledger.close()
    # Durable: a new process (after kill -9) reads the same.
    again = Ledger(tmp_path)
    assert again.figures() == (0, 1, 0)
    again.close()

"""hold_until_stable at unit level: a fake engine and clocks (the end-to-end test with real
peers, also across kill -9, is in test_routing_e2e.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from dicomdata import ct_series
from relay.config.model import Destination, SenderConfig
from relay.send.hold import StudyHold, held_studies
from relay.send.results import Outcome, SendResult
from relay.send.sender import DestinationSender
from relay.spool import Spool

HELD = Destination("research", "RESEARCH", "127.0.0.1", 104, hold_until_stable=60,
                   hold_max=600)


class Engine:
    name = "fake"
    batch_wait = 0.0

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False) -> Iterator[SendResult]:
        self.calls.append(sorted(f.name for f in files))
        for f in files:
            yield SendResult(f, Outcome.DELIVERED, 0)

    def release(self, destination: Destination) -> None:
        pass


class Wall:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _queue_study(spool: Spool, folder: Path, count: int, at: float, prefix: str) -> list[Path]:
    ct_series(folder, count)
    out = []
    for i, f in enumerate(sorted(folder.iterdir())):
        target = spool.outbox("research") / f"{prefix}{i}.dcm"
        os.link(f, target)
        os.utime(target, (at, at))
        out.append(target)
    return out


def _sender(spool: Spool, engine: Engine, wall: Wall) -> DestinationSender:
    return DestinationSender(spool, HELD, engine, SenderConfig(batch_size=2),  # type: ignore[arg-type]
                             clock=lambda: 0.0, wall=wall)


def test_a_study_goes_only_once_quiet_and_whole(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["research"]).create()
    wall = Wall()
    a = _queue_study(spool, tmp_path / "a", 3, wall.now - 10, "a")
    b = _queue_study(spool, tmp_path / "b", 2, wall.now - 70, "b")
    engine = Engine()
    sender = _sender(spool, engine, wall)
    assert sender.load_backlog() == 5
    assert {n for _, n, _ in sender.held()} == {3, 2}
    # b has been quiet for 70 s: it goes, whole (batch_size 2 does not split a study).
    sender.send_batch(sender._next_batch(idle_limit=0))
    assert engine.calls == [sorted(p.name for p in b)]
    assert sender._next_batch(idle_limit=0) == [], "a came 10 s ago: held"
    # a new object of study a arrives: its timer starts again from that one.
    wall.now += 55
    late = spool.outbox("research") / "a9.dcm"
    os.link(a[0], late)
    os.utime(late, (wall.now, wall.now))
    sender.enqueue(late)
    wall.now += 30  # 85 s after the first three, 30 after the last
    assert sender._next_batch(idle_limit=0) == []
    wall.now += 31
    sender.send_batch(sender._next_batch(idle_limit=0))
    assert engine.calls[-1] == sorted(p.name for p in [*a, late])
    assert sender.pending() == 0 and sender.held() == []


def test_a_growing_study_goes_at_hold_max(tmp_path: Path) -> None:
    hold = StudyHold(60, 600)
    first = 1000.0
    for i in range(20):  # an object every 30 s: never quiet for 60 s
        hold.add(Path(f"{i}.dcm"), "1.2.3", first + 30 * i)
        assert list(hold.release(first + 30 * i + 29)) == []
    assert list(hold.release(first + 599)) == []
    [study] = list(hold.release(first + 600))  # 600 s after its first object
    assert len(study.paths) == 20 and hold.studies == {}


def test_held_studies_for_status(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", ["research"]).create()
    _queue_study(spool, tmp_path / "a", 2, 5000.0, "a")
    [study] = held_studies(spool.queued("research"))
    assert len(study.paths) == 2 and study.first == study.last == 5000.0

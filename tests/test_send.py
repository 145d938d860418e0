"""Sender bookkeeping: status → spool move, backoff. A fake engine and clock (unit level);
the same behaviour against real peers is in test_e2e.py and test_sender_statuses.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import logged_events
from relay.config.model import Destination, SenderConfig
from relay.send.results import Outcome, SendResult, classify_status
from relay.send.sender import DestinationSender, backoff_delay
from relay.spool import Spool

DEST = Destination("central", "PACS", "127.0.0.1", 104)


class FakeEngine:
    """Answers each file with the status scripted for its name (queue of answers)."""

    name = "fake"
    batch_wait = 0.0

    def __init__(self, script: dict[str, list[int | None]]) -> None:
        self.script = script
        self.calls: list[list[str]] = []

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False) -> Iterator[SendResult]:
        self.calls.append([f.name for f in files])
        for f in files:
            status = self.script[f.name].pop(0)
            outcome = Outcome.RETRY if status is None else classify_status(status)
            yield SendResult(f, outcome, status, "scripted")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _queued(spool: Spool, *names: str) -> list[Path]:
    out = []
    for name in names:
        path = spool.outbox("central") / name
        path.write_bytes(b"x")
        out.append(path)
    return out


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path, ["central"]).create()


def _sender(spool: Spool, engine: FakeEngine, clock: Clock) -> DestinationSender:
    cfg = SenderConfig(batch_size=10, retry_initial=2.0, retry_max=10.0)
    return DestinationSender(spool, DEST, engine, cfg, clock=clock,  # type: ignore[arg-type]
                             events=logged_events())


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, Outcome.DELIVERED), (0xB000, Outcome.DELIVERED), (0xB006, Outcome.DELIVERED),
    (0xB007, Outcome.DELIVERED), (0xA700, Outcome.RETRY), (0xA7FF, Outcome.RETRY),
    (0xA900, Outcome.FAILED), (0xC000, Outcome.FAILED), (0xCFFF, Outcome.FAILED),
    (0x0122, Outcome.FAILED), (0x0124, Outcome.FAILED), (0xB001, Outcome.FAILED),
])
def test_classify_status(status: int, outcome: Outcome) -> None:
    assert classify_status(status) is outcome


def test_backoff_is_capped_exponential() -> None:
    assert [backoff_delay(n, 2.0, 10.0) for n in range(1, 6)] == [2.0, 4.0, 8.0, 10.0, 10.0]


def test_statuses_become_spool_moves(spool: Spool) -> None:
    ok, warn, full, bad, odd = _queued(spool, "ok.dcm", "warn.dcm", "full.dcm", "bad.dcm",
                                       "odd.dcm")
    engine = FakeEngine({"ok.dcm": [0], "warn.dcm": [0xB000], "full.dcm": [0xA700],
                         "bad.dcm": [0xA900], "odd.dcm": [0xC123]})
    sender = _sender(spool, engine, Clock())
    sender.load_backlog()
    sender.send_batch(sender._next_batch())
    assert not ok.exists() and not warn.exists(), "success and B000 count as delivered"
    assert full.exists(), "A700 stays queued"
    assert (spool.failed / "status-A900" / "central--bad.dcm").exists()
    assert (spool.failed / "status-C123" / "central--odd.dcm").exists()
    assert sender.stats.delivered == 2 and sender.stats.failed == 2
    assert sender.pending() == 1


def test_retryable_comes_back_after_backoff(spool: Spool) -> None:
    (full,) = _queued(spool, "full.dcm")
    ok = _queued(spool, "ok.dcm")[0]
    engine = FakeEngine({"full.dcm": [0xA700, 0xA700, 0x0000], "ok.dcm": [0]})
    clock = Clock()
    sender = _sender(spool, engine, clock)
    sender.load_backlog()
    sender.send_batch(sender._next_batch())
    assert not ok.exists() and full.exists()
    clock.now += 1.9
    sender.stop()  # _next_batch returns [] instead of waiting once stopped
    assert sender._next_batch() == []
    sender._stop.clear()
    clock.now += 0.2  # 2.1 s after: the first retry (2 s) is due
    sender.send_batch(sender._next_batch())
    assert full.exists()
    clock.now += 4.1  # second retry after 4 s
    sender.send_batch(sender._next_batch())
    assert not full.exists()
    assert engine.calls == [["full.dcm", "ok.dcm"], ["full.dcm"], ["full.dcm"]]


def test_destination_down_holds_queue_in_order(spool: Spool) -> None:
    files = _queued(spool, "a.dcm", "b.dcm")
    engine = FakeEngine({"a.dcm": [None, 0], "b.dcm": [None, 0]})
    clock = Clock()
    sender = _sender(spool, engine, clock)
    sender.load_backlog()
    sender.send_batch(sender._next_batch())
    assert all(f.exists() for f in files), "nothing deleted while the destination is down"
    assert sender._hold_until == clock.now + 2.0
    clock.now += 2.0
    sender.send_batch(sender._next_batch())
    assert not any(f.exists() for f in files)
    assert engine.calls == [["a.dcm", "b.dcm"], ["a.dcm", "b.dcm"]]


def test_forgotten_file_is_retried_not_dropped(spool: Spool) -> None:
    (path,) = _queued(spool, "a.dcm")

    class Forgetful(FakeEngine):
        def send(self, files, destination, calling_ae, timeout,  # noqa: ANN001, ANN202
                 keep_open=False):  # noqa: ANN001
            return iter(())

    sender = _sender(spool, Forgetful({}), Clock())
    sender.load_backlog()
    results = sender.send_batch(sender._next_batch())
    assert results[0].outcome is Outcome.RETRY and path.exists()


def test_object_in_flight_at_a_break_is_set_aside_and_the_rest_goes_on(spool: Spool) -> None:
    files = _queued(spool, "a.dcm", "b.dcm", "c.dcm")

    class Breaking(FakeEngine):
        """The association breaks while a.dcm is on the wire, every time."""

        def send(self, files, destination, calling_ae, timeout,  # noqa: ANN001, ANN202
                 keep_open=False):  # noqa: ANN001
            self.calls.append([f.name for f in files])
            for i, f in enumerate(files):
                if f.name == "a.dcm":
                    yield SendResult(f, Outcome.RETRY, None, "aborted", in_flight=True)
                    for rest in files[i + 1:]:
                        yield SendResult(rest, Outcome.RETRY, None, "association lost")
                    return
                yield SendResult(f, Outcome.DELIVERED, 0, "")

    clock = Clock()
    engine = Breaking({})
    sender = _sender(spool, engine, clock)
    sender.load_backlog()
    sender.send_batch(sender._next_batch())
    # b and c were never on the wire: they go next, at once, without a.
    assert sender._next_batch() == [files[1], files[2]]
    sender._ready.extendleft([files[2], files[1]])
    for _ in range(2):  # a keeps breaking the association whenever it is sent
        clock.now += 100
        sender.send_batch(sender._next_batch())
    assert engine.calls == [["a.dcm", "b.dcm", "c.dcm"], ["b.dcm", "c.dcm", "a.dcm"], ["a.dcm"]]
    assert not any(f.exists() for f in files)
    assert (spool.failed / "breaks-association" / "central--a.dcm").exists()


def test_a_small_batch_waits_for_more_but_not_for_long(spool: Spool) -> None:
    # [sender].batch_wait: a lone object waits that long for others to share its batch (and
    # its tool process); a full batch never waits.
    import threading

    engine = FakeEngine({})
    cfg = SenderConfig(batch_size=3, batch_wait=30.0)
    sender = DestinationSender(spool, DEST, engine, cfg)  # type: ignore[arg-type]
    first, second, third = _queued(spool, "a.dcm", "b.dcm", "c.dcm")
    got: list[list[Path]] = []
    taker = threading.Thread(target=lambda: got.append(sender._next_batch()))
    sender.enqueue(first)
    taker.start()
    taker.join(timeout=0.3)
    assert taker.is_alive(), "one object, far younger than batch_wait: still waiting"
    sender.enqueue(second)
    sender.enqueue(third)  # the batch is full: it goes at once
    taker.join(timeout=30)
    assert got == [[first, second, third]]
    # Aged: a lone object goes once its wait is over.
    quick = DestinationSender(spool, DEST, engine, SenderConfig(batch_wait=0.05))  # type: ignore[arg-type]
    quick.enqueue(first)
    assert quick._next_batch() == [first]


def test_batch_wait_defaults_to_the_engines() -> None:
    from relay.toolkits.dcmtk import DcmtkEngine
    from relay.toolkits.embedded import EmbeddedEngine

    assert EmbeddedEngine.batch_wait == 0.0  # its association stays open between batches
    assert DcmtkEngine.batch_wait > 0  # a dcmsend per batch


def test_unanswered_while_others_are_answered_goes_to_failed_after_three(
        spool: Spool) -> None:
    # A tool that silently skips one object (no response, no error we can read) while the
    # rest of its batch is answered: retried, but not for ever.
    skipped, *others = _queued(spool, "skipped.dcm", "a.dcm", "b.dcm", "c.dcm")
    engine = FakeEngine({"skipped.dcm": [None, None, None], "a.dcm": [0], "b.dcm": [0xA700, 0],
                         "c.dcm": [0xA700, 0xA700, 0]})
    clock = Clock()
    sender = _sender(spool, engine, clock)
    sender.load_backlog()
    for _ in range(3):
        sender.send_batch(sender._next_batch())
        assert sender._hold_until < clock.now, "others were answered: not 'destination down'"
        clock.now += 60
    assert not skipped.exists() and not any(p.exists() for p in others)
    [sidecar] = (spool.failed / "not-sendable").glob("*.json")
    assert "no response in 3 consecutive attempts" in sidecar.read_text()
    assert sender.stats.delivered == 3 and sender.stats.failed == 1
    assert engine.calls[0] == ["skipped.dcm", "a.dcm", "b.dcm", "c.dcm"]


def test_objects_our_tool_never_sent_are_not_counted_as_unanswered(spool: Spool) -> None:
    # Our tool dies after the first object of each batch (dcm4che's JVM crashed or hung
    # between objects): the others were never on the wire, so however often it happens they
    # wait for a working tool; they are not quarantined as "unanswered".
    class DiesAfterOne(FakeEngine):
        def send(self, files, destination, calling_ae, timeout,  # noqa: ANN001, ANN202
                 keep_open=False):  # noqa: ANN001
            self.calls.append([f.name for f in files])
            yield SendResult(files[0], Outcome.DELIVERED, 0, "scripted")
            for f in files[1:]:
                yield SendResult(f, Outcome.RETRY, None, "local tool failure: JVM died",
                                 local_failure=True)

    files = _queued(spool, "a.dcm", "b.dcm", "c.dcm", "d.dcm")
    engine = DiesAfterOne({})
    clock = Clock()
    sender = _sender(spool, engine, clock)
    sender.load_backlog()
    for _ in range(4):
        if not sender.pending():
            break
        sender.send_batch(sender._next_batch())
        clock.now += 60
    assert [f.exists() for f in files] == [False, False, False, False]
    assert sender.stats.delivered == 4 and sender.stats.failed == 0
    assert not list(spool.failed.rglob("*.dcm"))
    assert engine.calls == [["a.dcm", "b.dcm", "c.dcm", "d.dcm"], ["b.dcm", "c.dcm", "d.dcm"],
                            ["c.dcm", "d.dcm"], ["d.dcm"]]


def test_an_answer_resets_the_unanswered_count(spool: Spool) -> None:
    path, other = _queued(spool, "x.dcm", "y.dcm")
    engine = FakeEngine({"x.dcm": [None, None, 0xA700, None, None, 0],
                         "y.dcm": [0xA700] * 5 + [0]})
    clock = Clock()
    sender = _sender(spool, engine, clock)
    sender.load_backlog()
    for _ in range(6):
        sender.send_batch(sender._next_batch())
        clock.now += 60
    assert not path.exists() and not other.exists(), "never three unanswered in a row"
    assert sender.stats.failed == 0


def test_a_local_tool_failure_holds_the_queue_and_says_so(
        spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    class BrokenTool(FakeEngine):
        def send(self, files, destination, calling_ae, timeout,  # noqa: ANN001, ANN202
                 keep_open=False):  # noqa: ANN001
            self.calls.append([f.name for f in files])
            for f in files:
                yield SendResult(f, Outcome.RETRY, None, "local tool failure: java: not found",
                                 local_failure=True)

    files = _queued(spool, "a.dcm", "b.dcm")
    clock = Clock()
    sender = _sender(spool, BrokenTool({}), clock)
    sender.load_backlog()
    with caplog.at_level("ERROR", logger="relay.send"):
        for _ in range(5):
            sender.send_batch(sender._next_batch())
            clock.now = sender._hold_until
    assert all(f.exists() for f in files) and sender.stats.failed == 0
    assert "local tool failure: java: not found (not the destination's fault)" in caplog.text
    assert "unavailable" not in caplog.text


class RepublishingSpool(Spool):
    """A spool in which, as each delivered copy goes, the processor publishes the same name
    again from another thread: what start-up does when it repeats the edit of an original a
    crash left in work/ (the new link lands where the first edit's was)."""

    sender: DestinationSender
    republished: list[threading.Thread]

    def delivered(self, path: Path) -> None:
        super().delivered(path)

        def publish_again() -> None:
            path.write_bytes(b"x")
            self.sender.enqueue(path)

        thread = threading.Thread(target=publish_again)
        thread.start()
        # Give the processor's thread time to run inside the sender's settle: with the
        # queue's lock held there, it must wait for it; without, it runs now.
        thread.join(timeout=0.3)
        self.republished.append(thread)


def test_a_copy_published_again_while_its_twin_is_delivered_is_never_left_unseen(
        tmp_path: Path) -> None:
    spool = RepublishingSpool(tmp_path, ["central"]).create()
    spool.republished = []
    engine = FakeEngine({"a.dcm": [0x0000, 0x0000]})
    sender = _sender(spool, engine, Clock())
    spool.sender = sender
    [path] = _queued(spool, "a.dcm")
    sender.enqueue(path)
    sender.send_batch(sender._next_batch(idle_limit=0))
    for thread in spool.republished:
        thread.join(timeout=5)
    # The copy published again is in out/ and in the sender's queue: it is sent, not left
    # for the next restart to find.
    assert path.exists()
    assert sender.pending() == 1
    assert sender._next_batch(idle_limit=0) == [path]

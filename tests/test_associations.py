"""relay.toolkits.associations: the file head written for each received object, the gate
that pauses an association's reactor, the supported contexts' per-association copy."""

from __future__ import annotations

import copy
import threading
import time
from types import SimpleNamespace

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from relay.toolkits.associations import ReactorGate, cheap_to_copy, file_head


def received(sop_class: str, sop_instance: str, syntax: str, calling: str) -> Event:
    """An EVT_C_STORE event as pynetdicom makes it (its request and context; the
    association faked: only its requestor's AE title is read)."""
    request = C_STORE()
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    context = SimpleNamespace(transfer_syntax=syntax)
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=calling))
    return Event(assoc, SimpleNamespace(description="C-STORE", is_intervention=True),
                 {"request": request, "context": context})


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax", "calling"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", ExplicitVRLittleEndian, "MODALITY"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", JPEGBaseline8Bit, "CT01"),  # odd lengths
    ("1.2.840.10008.5.1.4.1.1.7", "2.25.1", ExplicitVRLittleEndian, "A"),
])
def test_file_head_is_what_pydicom_writes(sop_class: str, sop_instance: str, syntax: str,
                                          calling: str) -> None:
    event = received(sop_class, sop_instance, syntax, calling)
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = calling
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    assert file_head(event) == b"\x00" * 128 + b"DICM" + buffer.getvalue()


class Reactor(threading.Thread):
    """Stands for an association's thread: its loop steps, and parks at the gate when it is
    cleared (as pynetdicom's reactor does at `_reactor_checkpoint`)."""

    def __init__(self, gate_type: type) -> None:
        super().__init__(daemon=True)
        self.gate = gate_type(self) if gate_type is ReactorGate else gate_type()
        self.steps = 0
        self.stopped = False

    def run(self) -> None:
        while not self.stopped:
            time.sleep(0.001)
            self.gate.wait()
            self.steps += 1


def paused_steps(reactor: Reactor, rounds: int = 100) -> int:
    """Steps the reactor took while a sender held it cleared (should be none)."""
    reactor.start()
    moved = 0
    for _ in range(rounds):
        reactor.gate.clear()
        before = reactor.steps
        time.sleep(0.002)
        moved += reactor.steps - before
        reactor.gate.set()
    reactor.stopped = True
    reactor.gate.set()
    reactor.join(2)
    return moved


def test_a_cleared_gate_holds_the_reactor_at_once() -> None:
    assert paused_steps(Reactor(ReactorGate)) == 0


def test_the_race_the_gate_closes_is_real_with_a_plain_event() -> None:
    """pynetdicom's threading.Event: cleared, the reactor still finishes the step it is in
    (and with it, takes the message the sender waits for)."""
    assert paused_steps(Reactor(threading.Event)) > 0


def test_the_reactor_clearing_its_own_gate_does_not_wait() -> None:
    elapsed: list[float] = []

    class Serving(Reactor):
        def run(self) -> None:  # an acceptor sends from its reactor's own thread
            started = time.monotonic()
            self.gate.clear()
            elapsed.append(time.monotonic() - started)

    serving = Serving(ReactorGate)
    serving.start()
    serving.join(5)
    assert elapsed and elapsed[0] < ReactorGate.PARK_TIMEOUT / 2


def test_an_even_presentation_context_id_is_taken() -> None:
    """dcm4che's stgcmtscu proposes context ID 2: pynetdicom would raise inside its reactor
    and hang the association; the relay takes it, and still refuses IDs out of range."""
    import pytest
    from pynetdicom.presentation import PresentationContext

    import relay.toolkits.associations  # noqa: F401 - installs the lenient setter

    cx = PresentationContext()
    cx.context_id = 2
    assert cx.context_id == 2
    for bad in (0, 256):
        with pytest.raises(ValueError, match="between 1 and 255"):
            cx.context_id = bad


def test_a_cheap_copy_of_the_supported_contexts_is_what_a_deep_copy_gives() -> None:
    """The server's per-association deepcopy of cheap_to_copy's contexts: the same
    contexts (syntaxes, roles), none of its lists shared with the server's own, so that one
    association's negotiation cannot change what the next is offered."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

    ae = AE()
    for cx in AllStoragePresentationContexts[:20]:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES,
                                 scu_role=True, scp_role=True)
    ae.add_supported_context("1.2.840.10008.1.1")  # no roles: None, None
    served = cheap_to_copy(ae.supported_contexts)
    deep, cheap = copy.deepcopy(ae.supported_contexts), copy.deepcopy(served)

    def seen(cx: object) -> tuple[object, ...]:
        c: object = cx
        return (c.abstract_syntax, list(c.transfer_syntax), c.scu_role,  # type: ignore[attr-defined]
                c.scp_role, c.context_id, c.as_scu, c.as_scp)  # type: ignore[attr-defined]

    assert [seen(cx) for cx in cheap] == [seen(cx) for cx in deep]
    before = [seen(cx) for cx in served]
    for cx in cheap:  # what a negotiation may do to its copy
        del cx.transfer_syntax[1:]  # the getter gives the list itself
        cx.context_id = 7
        cx.scu_role, cx.scp_role = False, False
    assert [seen(cx) for cx in served] == before
    assert len(served[-1].transfer_syntax) == len(ALL_TRANSFER_SYNTAXES)
    assert type(copy.deepcopy(cheap)[0]) is type(served[0])  # cheap again the next time

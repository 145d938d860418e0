"""The send vocabulary: what a destination answered for each object (SendResult, Outcome),
what a C-STORE status means, and the interface a destination's sender talks to (Transport:
an engine for DIMSE destinations, the STOW-RS sender for DICOMweb ones)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydicom.filereader import read_file_meta_info

from relay.edit.scan import file_meta_values

if TYPE_CHECKING:
    from relay.config.model import Destination


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # success or a warning the standard counts as stored
    RETRY = "retry"  # the destination may take it later: stays queued
    FAILED = "failed"  # the destination will never take it as it is: quarantine


# C-STORE warnings that still mean "stored" (PS3.4 B.2.3): coercion, element discarded,
# data set does not match SOP class.
STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


def classify_status(status: int) -> Outcome:
    """What a C-STORE response status means for the object we sent."""
    if status == 0x0000 or status in STORED_WARNINGS:
        return Outcome.DELIVERED
    if 0xA700 <= status <= 0xA7FF:  # out of resources: the PACS may have room later
        return Outcome.RETRY
    # 0xA9xx (data set does not match SOP class), 0xCxxx (cannot understand), 0x01xx/0x02xx
    # (refused, not supported, not authorised, …) and any unknown code: sending the same bytes
    # again will not help. The object goes to failed/ with the status in its sidecar.
    return Outcome.FAILED


@dataclass(frozen=True)
class SendResult:
    path: Path
    outcome: Outcome
    status: int | None  # the C-STORE status, None when no response was received
    detail: str = ""
    # The association broke while this very object was on the wire (not merely queued behind
    # it): the destination was reachable, and this object may be what makes it abort.
    in_flight: bool = False
    # The local toolkit program failed on its own, before reaching the destination (a broken
    # installation, a missing Java, a bad option): not the destination's fault, nor this file's.
    local_failure: bool = False
    # DICOMweb: the HTTP status of the request it was in, and the server's Retry-After.
    http_status: int | None = None
    retry_after: float | None = None
    # The destination refused the object's transfer syntax for its SOP class (no accepted
    # presentation context): the case `transcode = "on-refusal"` decompresses.
    refused_syntax: bool = False

    @property
    def status_text(self) -> str:
        if self.status is None:
            return f"HTTP {self.http_status}" if self.http_status else "no response"
        return f"0x{self.status:04X}"


def reason_of(r: SendResult, unanswered: str) -> str:
    """A result's reason for failed/ folders and metrics: its DIMSE status (status-A900),
    else its HTTP status (http-403), else `unanswered`."""
    if r.status is not None:
        return f"status-{r.status:04X}"
    return f"http-{r.http_status}" if r.http_status else unanswered


def local_failures(files: list[Path], detail: str) -> list[SendResult]:
    """The local tool failed on its own: every file waits (RETRY), nobody's fault but ours."""
    return [SendResult(path, Outcome.RETRY, None, f"local tool failure: {detail}",
                       local_failure=True) for path in files]


def retry_all(files: list[Path], detail: str) -> list[SendResult]:
    """No association (refused, rejected, timed out): every file waits for the next try."""
    return [SendResult(path, Outcome.RETRY, None, detail) for path in files]


Context = tuple[str, str]  # a presentation context: (SOP class UID, transfer syntax UID)


@dataclass(frozen=True)
class Outgoing:
    """A file about to be sent, as its file meta information names it."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str

    @property
    def context(self) -> Context:
        return self.sop_class_uid, self.transfer_syntax


# Media Storage SOP Class UID, Media Storage SOP Instance UID, Transfer Syntax UID: in the
# order Outgoing takes them.
_OUTGOING_META = (0x00020002, 0x00020003, 0x00020010)


def read_outgoing(files: Iterable[Path]) -> tuple[list[Outgoing], list[SendResult]]:
    """Each file's file meta information; a file whose meta cannot be read fails alone
    (FAILED: sending it again will not make it readable)."""
    ready: list[Outgoing] = []
    failed: list[SendResult] = []
    for path in files:
        try:
            quick = file_meta_values(path, set(_OUTGOING_META))
            uids = [quick.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")
                    for tag in _OUTGOING_META] if quick is not None else []
            if uids and all(uids):
                ready.append(Outgoing(path, *uids))
                continue
            meta = read_file_meta_info(path)
            ready.append(Outgoing(path, str(meta.MediaStorageSOPClassUID),
                                  str(meta.MediaStorageSOPInstanceUID),
                                  str(meta.TransferSyntaxUID)))
        except Exception as exc:  # noqa: BLE001 - an unreadable file fails alone
            failed.append(SendResult(path, Outcome.FAILED, None,
                                     f"cannot read file meta: {exc}"))
    return ready, failed


class DestinationUnavailable(Exception):
    """Association could not be established (refused, rejected, timed out)."""


class ToolFailure(Exception):
    """The local toolkit program failed on its own, without reaching the destination; the
    message carries its last output lines."""


class Transport(Protocol):
    """The sending side a destination's sender talks to: an Engine for DIMSE destinations,
    relay.send.stow.StowSender for DICOMweb ones."""

    name: str
    batch_wait: float

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False) -> Iterator[SendResult]: ...

    def release(self, destination: Destination) -> None: ...

    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None: ...

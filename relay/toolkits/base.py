"""The one interface every DICOM toolkit adapter implements.

The pipeline only ever talks to an Engine: it never asks which toolkit it runs on.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from relay.config import Config, Destination
    from relay.edit import ToolkitConverter
    from relay.spool import Spool


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


def last_lines(output: str, count: int = 4) -> str:
    """A tool's last words, for a log line: non-blank lines, Java stack frames left out."""
    lines = [line.strip() for line in output.splitlines()
             if line.strip() and not line.lstrip().startswith("at ")]
    return " | ".join(lines[-count:]) or "no output"


def local_failures(files: list[Path], detail: str) -> list[SendResult]:
    """The local tool failed on its own: every file waits (RETRY), nobody's fault but ours."""
    return [SendResult(path, Outcome.RETRY, None, f"local tool failure: {detail}",
                       local_failure=True) for path in files]


class DestinationUnavailable(Exception):
    """Association could not be established (refused, rejected, timed out)."""


class ToolFailure(Exception):
    """The local toolkit program failed on its own, without reaching the destination; the
    message carries its last output lines."""


class Receiver(ABC):
    """A C-STORE SCP that writes only complete objects into spool/incoming/."""

    @abstractmethod
    def start(self) -> None:
        """Start listening; raise OSError with a clear message when the port is taken."""

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def alive(self) -> bool: ...

    def restarts(self) -> int:
        """Times the receiver died and was started again (a supervised process)."""
        return 0


class Transport(Protocol):
    """The sending side a destination's sender talks to: an Engine for DIMSE destinations,
    relay.stow.StowSender for DICOMweb ones."""

    name: str
    batch_wait: float

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False) -> Iterator[SendResult]: ...

    def release(self, destination: Destination) -> None: ...

    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None: ...


def reason_of(r: SendResult, unanswered: str) -> str:
    """A result's reason for failed/ folders and metrics: its DIMSE status (status-A900),
    else its HTTP status (http-403), else `unanswered`."""
    if r.status is not None:
        return f"status-{r.status:04X}"
    return f"http-{r.http_status}" if r.http_status else unanswered


class Engine(ABC):
    name: str = "?"
    # Seconds a small batch waits for more objects (see SenderConfig.batch_wait). Engines that
    # start a tool process per batch amortise its start over a few objects of a stream.
    batch_wait: float = 0.0
    # Its receiver refuses associations to any called AE title but ours, so `called_ae` (a
    # filter key) is known: [receiver].ae_title. DCMTK's storescp accepts any.
    knows_called_ae: bool = True

    @abstractmethod
    def receiver(self, config: Config, spool: Spool, beside_work: bool = False) -> Receiver:
        """The engine's C-STORE SCP. beside_work: this process also edits and sends; an
        engine whose receiver would run inside it then gives the receiver a process of its
        own (toolkit receivers are processes anyway)."""

    @abstractmethod
    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False) -> Iterator[SendResult]:
        """Send files over as few associations as possible; yield one result per file, in any
        order, for every file given (connection problems yield RETRY results).
        keep_open: the caller has more to send soon; an engine that can may keep the
        association for the next call instead of releasing it (then `release` ends it)."""

    def release(self, destination: Destination) -> None:
        """Release an association `send(keep_open=True)` kept for this destination."""
        del destination  # engines that run one tool process per batch keep nothing open

    @abstractmethod
    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None:
        """C-ECHO; raise DestinationUnavailable with the reason when it fails (ToolFailure
        when the local tool failed before reaching the destination)."""

    def describe(self) -> str:
        return self.name

    def toolkit_converter(self) -> ToolkitConverter | None:
        """The toolkit's own DICOM ⇄ XML tools, for `converter = "toolkit"` (None: none)."""
        return None

"""The one interface every DICOM toolkit adapter implements.

The pipeline only ever talks to an Engine: it never asks which toolkit it runs on. What a
send answers is the send stage's vocabulary (relay.send.results).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from relay.toolkits.common import ToolGet

if TYPE_CHECKING:
    from relay.config.model import Config, Destination
    from relay.edit.editor import ToolkitConverter
    from relay.send.results import SendResult
    from relay.services.scp import Services
    from relay.spool import Spool


class Receiver(ABC):
    """A C-STORE SCP that writes only complete objects into spool/incoming/."""

    @abstractmethod
    def start(self) -> None:
        """Start listening; raise OSError with a clear message when the port is taken."""

    @abstractmethod
    def stop(self) -> None: ...

    def restarts(self) -> int:
        """Times the receiver died and was started again (a supervised process)."""
        return 0


class Engine(ABC):
    name: str = "?"
    # Seconds a small batch waits for more objects (see SenderConfig.batch_wait). Engines that
    # start a tool process per batch amortise its start over a few objects of a stream.
    batch_wait: float = 0.0
    # Its receiver refuses associations to any called AE title but ours, so `called_ae` (a
    # filter key) is known: [receiver].ae_title. DCMTK's storescp accepts any.
    knows_called_ae: bool = True

    @abstractmethod
    def receiver(self, config: Config, spool: Spool, beside_work: bool = False,
                 services: Services | None = None) -> Receiver:
        """The engine's C-STORE SCP. beside_work: this process also edits and sends; an
        engine whose receiver would run inside it then gives the receiver a process of its
        own (toolkit receivers are processes anyway). services: query/retrieve, for a
        receiver that answers it on its own port too (the embedded one; a toolkit's
        storescp cannot: query/retrieve is then on [query].port only)."""

    @abstractmethod
    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False,
             confirm_each: bool = True) -> Iterator[SendResult]:
        """Send files over as few associations as possible; yield one result per file, in any
        order, for every file given (connection problems yield RETRY results).
        keep_open: the caller has more to send soon; an engine that can may keep the
        association for the next call instead of releasing it (then `release` ends it).
        confirm_each: each success as its response arrives (a relay killed mid-batch then
        sends again only what was not confirmed); False: the caller needs the results only
        when the call is done (a served C-MOVE, whose objects a restart never sends again),
        and an engine may spare what following each response costs it."""

    def release(self, destination: Destination) -> None:
        """Release an association `send(keep_open=True)` kept for this destination."""
        del destination  # engines that run one tool process per batch keep nothing open

    @abstractmethod
    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None:
        """C-ECHO; raise DestinationUnavailable with the reason when it fails (ToolFailure
        when the local tool failed before reaching the destination)."""

    def prepare(self) -> None:
        """Start, in the background, what sending and converting will need (a JVM), so that
        the first object does not wait for it. Failures surface again where they matter."""
        return  # engines whose tools start per call have nothing to start ahead

    def describe(self) -> str:
        return self.name

    def get_by_tool(self, source: Destination, query: Path, model: str, calling_ae: str,
                    folder: Path, timeout: float, storage: list[tuple[str, list[str]]]
                    ) -> ToolGet | None:
        """A C-GET from `source` by the toolkit's own SCU (query: the identifier as a DICOM
        file; model: the Q/R model's Get SOP class), objects stored into `folder`; storage:
        the classes and transfer syntaxes to take them in, for a tool that is told. None:
        the engine has none that fits (no such tool, or TLS it cannot speak): the relay's own
        C-GET (pynetdicom) fetches then."""
        del source, query, model, calling_ae, folder, timeout, storage
        return None

    def toolkit_converter(self) -> ToolkitConverter | None:
        """The toolkit's own DICOM ⇄ XML tools, for `converter = "toolkit"` (None: none)."""
        return None

"""Query/retrieve as a service of the relay: what it negotiates, its handlers, and the SCP on
[query].port. The embedded receiver binds the same handlers on [receiver].port.

Each request ends in one event (Queried, Retrieved), emitted when its final response is sent
(EVT_DIMSE_SENT): the status is the one the requester got, whoever set it (our handler, or
pynetdicom answering for a handler that failed), and the counts are pynetdicom's own.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from relay.config.model import Destination
from relay.events import EventBus, Queried, Retrieved
from relay.ops.logs import shown
from relay.services.find import CANCEL, PENDING, forward_find, status
from relay.services.move import (
    MOVE_DESTINATION_UNKNOWN,
    SERVE_MOVE,
    MoveProgress,
    forward_objects,
)
from relay.services.retrieve import (
    RETRIEVING,
    SUCCESS,
    Fetch,
    Inboxes,
    ToolkitEngine,
    serve_objects,
    store_contexts,
)
from relay.services.upstream import UNABLE_TO_PROCESS, PacsUnavailable, Upstream
from relay.toolkits.associations import (
    accept_tls_later,
    cheap_to_copy,
    open_connection,
    prefer_requestor_syntax,
    refused_host,
    serve,
    set_nodelay,
    shut_down,
)
from relay.toolkits.tls import client_context, server_context

if TYPE_CHECKING:
    from pathlib import Path

    from relay.config.model import Config, Modality
    from relay.services.commitment import StorageCommitment

log = logging.getLogger("relay.services")

FIND_MODELS = (PatientRootQueryRetrieveInformationModelFind,
               StudyRootQueryRetrieveInformationModelFind, ModalityWorklistInformationFind)
GET_MODELS = (PatientRootQueryRetrieveInformationModelGet,
              StudyRootQueryRetrieveInformationModelGet)
MOVE_MODELS = (PatientRootQueryRetrieveInformationModelMove,
               StudyRootQueryRetrieveInformationModelMove)
QR_MODELS = (*FIND_MODELS, *GET_MODELS, *MOVE_MODELS)
FINAL_RESPONSES = {0x8020: "C-FIND", 0x8010: "C-GET", 0x8021: "C-MOVE"}  # Command Field
KEYS_MAX = 400  # characters of a request's keys kept in the audit and history
STATUS_CANNOT_UNDERSTAND = 0xC000


def describe_keys(identifier: Dataset) -> tuple[str, str]:
    """A request's keys as `Keyword=value, …` and as keywords only (no patient values)."""
    with_values: list[str] = []
    names: list[str] = []
    for element in identifier:
        keyword = element.keyword or str(element.tag)
        if keyword == "QueryRetrieveLevel":
            continue
        names.append(keyword)
        value = "" if element.VR == "SQ" else str(element.value or "")
        with_values.append(f"{keyword}={value}" if value else keyword)
    return (", ".join(with_values)[:KEYS_MAX], ", ".join(names)[:KEYS_MAX])


@dataclass
class Request:
    """A query or retrieve in progress, until its final response is sent."""

    operation: str  # C-FIND | C-GET | C-MOVE
    requester: str
    host: str
    level: str
    keys: str
    key_names: str
    move_destination: str | None = None
    matches: int = 0  # C-FIND: matches passed on
    detail: str = ""


class QueryRetrieve:
    """The query/retrieve service: forwards to the [query] destination. One per process; the
    SCP on [query].port and the embedded receiver bind its handlers.

    engine: in the process that also sends (the services SCP's), the engine's toolkit takes
    part: its C-GET SCU fetches (when it has one) and its sender stores a C-MOVE's objects
    (`serve_move`); without one, pynetdicom does both (the embedded receiver's process)."""

    def __init__(self, config: Config, spool_root: Path, events: EventBus,
                 engine: ToolkitEngine | None = None) -> None:
        assert config.query is not None
        self.config = config
        self.engine = engine
        self.query = config.query
        self.upstream = Upstream(config)
        self.events = events
        self.inboxes = Inboxes(spool_root / RETRIEVING, self.upstream.destination.ae_title,
                               self.upstream.calling_ae)
        self._requests: dict[tuple[int, int], Request] = {}
        self._lock = threading.Lock()

    def start(self) -> None:
        """Leftovers of a relay process killed while retrieving go (never a routed object)."""
        self.inboxes.clean()

    def allows(self, calling_ae: str) -> bool:
        allowed = self.query.allowed_calling_aets
        return not allowed or calling_ae.strip() in allowed

    # --- what it negotiates and binds ---------------------------------------------------------

    @staticmethod
    def add_contexts(ae: AE, storage: bool) -> None:
        """The Q/R models; with `storage`, every storage class too, in both roles: the
        requester's C-GET takes objects as SCP, and in move mode the PACS stores to us."""
        for model in QR_MODELS:
            ae.add_supported_context(model, ALL_TRANSFER_SYNTAXES)
        if storage:
            for cx in AllStoragePresentationContexts:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES,
                                         scu_role=True, scp_role=True)

    def handlers(self) -> list[tuple[Any, Any]]:
        return [(evt.EVT_C_FIND, self.on_find), (evt.EVT_C_GET, self.on_get),
                (evt.EVT_C_MOVE, self.on_move), (evt.EVT_DIMSE_SENT, self.on_sent),
                (evt.EVT_CONN_CLOSE, self.on_close)]

    def answers_two_titles(self, own: str) -> bool:
        """Whether the relay must answer to move_ae_title besides its own AE title (the
        PACS's sub-operations of the relay's C-MOVE are addressed to it): pynetdicom's
        require_called_aet is then off and `refuse_unknown_called_ae` checks."""
        return self.query.retrieve == "move" and self.query.move_ae_title != own

    def refuse_unknown_called_ae(self, event: evt.Event, own: str) -> bool:
        """EVT_REQUESTED: reject (called AE not recognised) an association to neither of the
        relay's AE titles; True when rejected."""
        called = str(event.assoc.requestor.primitive.called_ae_title).strip()
        if called in (own, self.query.move_ae_title):
            return False
        log.warning("association from %s refused: called AE title %s is neither %s nor %s",
                    shown(event.assoc.requestor.ae_title), shown(called), own,
                    self.query.move_ae_title)
        event.assoc.acse.send_reject(0x01, 0x01, 0x07)
        return True

    def drop_contexts_if_not_allowed(self, event: evt.Event) -> None:
        """EVT_REQUESTED (after the receiver's checks): a caller outside
        [query].allowed_calling_aets may store, not query or retrieve."""
        if self.allows(event.assoc.requestor.ae_title):
            return
        acceptor = event.assoc.acceptor
        acceptor.supported_contexts = [cx for cx in acceptor.supported_contexts
                                       if cx.abstract_syntax not in QR_MODELS]

    # --- handlers -----------------------------------------------------------------------------

    def _begin(self, event: evt.Event, operation: str) -> tuple[Request, Dataset | None]:
        requestor = event.assoc.requestor
        try:
            identifier = event.identifier
            keys, key_names = describe_keys(identifier)
            level = str(identifier.get("QueryRetrieveLevel", "") or "")
        except Exception as exc:  # noqa: BLE001 - a request we cannot decode is refused
            identifier, keys, key_names, level = None, "", "", ""
            log.error("%s from %s: cannot decode its identifier (%s)", operation,
                      shown(requestor.ae_title), exc)
        if not level and event.context.abstract_syntax == ModalityWorklistInformationFind:
            level = "WORKLIST"
        request = Request(operation, requestor.ae_title.strip(), str(requestor.address),
                          level, keys, key_names)
        if identifier is None:
            request.detail = "identifier not decodable"
        with self._lock:
            self._requests[(id(event.assoc), int(event.message_id))] = request
        return request, identifier

    def on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        request, identifier = self._begin(event, "C-FIND")
        if identifier is None:
            yield status(STATUS_CANNOT_UNDERSTAND, "identifier not decodable"), None
            return
        log.info("C-FIND %s from %s: %s", request.level, shown(request.requester),
                 shown(request.key_names))
        for code, match in forward_find(self.upstream, identifier,
                                        str(event.context.abstract_syntax),
                                        lambda: bool(event.is_cancelled)):
            if code in PENDING:
                request.matches += 1
            elif isinstance(code, Dataset) and "ErrorComment" in code:
                request.detail = str(code.ErrorComment)
            yield code, match

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        request, identifier = self._begin(event, "C-GET")
        if identifier is None:
            raise ValueError("identifier not decodable")
        fetch = self._fetch(identifier, str(event.context.abstract_syntax))
        try:
            cancelled = lambda: bool(event.is_cancelled)  # noqa: E731
            total = self._count(fetch, request, cancelled)
            yield total
            yield from serve_objects(fetch, cancelled)
        finally:
            fetch.close()

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        request, identifier = self._begin(event, "C-MOVE")
        modality = self._move_destination(event, request)
        if modality is None:
            yield None, None
            return
        if identifier is None:
            raise ValueError("identifier not decodable")
        fetch = self._fetch(identifier, str(event.context.abstract_syntax))
        try:
            cancelled = lambda: bool(event.is_cancelled)  # noqa: E731
            total = self._count(fetch, request, cancelled)
            kwargs: dict[str, Any] = {
                "contexts": store_contexts(fetch.first),
                "evt_handlers": [(evt.EVT_CONN_OPEN, set_nodelay)]}
            if modality.tls is not None:
                kwargs["tls_args"] = (client_context(modality.tls), modality.host)
            yield modality.host, modality.port, kwargs
            yield total
            yield from serve_objects(fetch, cancelled)
        finally:
            fetch.close()

    def serve_move(self, event: evt.Event) -> Iterator[MoveProgress]:
        """A C-MOVE served by the relay (relay.services.move): as on_move, but the objects go
        to the move destination through the engine's sender."""
        assert self.engine is not None
        request, identifier = self._begin(event, "C-MOVE")
        modality = self._move_destination(event, request)
        if modality is None:
            yield MoveProgress(MOVE_DESTINATION_UNKNOWN, comment="unknown move destination")
            return
        if identifier is None:
            yield MoveProgress(STATUS_CANNOT_UNDERSTAND, comment="identifier not decodable")
            return
        seen_cancel: list[bool] = []

        def cancelled() -> bool:  # pynetdicom answers True once per C-CANCEL: kept here
            if not seen_cancel and event.is_cancelled:
                seen_cancel.append(True)
            return bool(seen_cancel)

        fetch = self._fetch(identifier, str(event.context.abstract_syntax))
        try:
            try:
                total = self._count(fetch, request, cancelled)
            except PacsUnavailable as exc:
                yield MoveProgress(CANCEL if cancelled() else UNABLE_TO_PROCESS,
                                   comment=str(exc))
                return
            if total == 0:
                yield MoveProgress(SUCCESS)
                return
            target = Destination(name=f"move destination {modality.ae_title}",
                                 ae_title=modality.ae_title, host=modality.host,
                                 port=modality.port, tls=modality.tls)
            for progress in forward_objects(fetch, total, self.engine, target,
                                            self.config.receiver.ae_title,
                                            self.upstream.timeout, cancelled):
                if progress.status == MOVE_DESTINATION_UNKNOWN:
                    request.detail = f"cannot store to the move destination {modality.describe()}"
                yield progress
        finally:
            fetch.close()

    def _move_destination(self, event: evt.Event, request: Request) -> Modality | None:
        destination = str(event.move_destination or "").strip()
        request.move_destination = destination
        modality = self.config.modality(destination)
        if modality is None:
            request.detail = f"move destination {destination!r} is not a [[modalities]] entry"
            log.warning("C-MOVE from %s: %s: refused (A801)", shown(request.requester),
                        shown(request.detail))
        return modality

    @staticmethod
    def _count(fetch: Fetch, request: Request, cancelled: Callable[[], bool]) -> int:
        """The number of objects, once the PACS said it; raise when it cannot (pynetdicom
        then answers a failure status) or the requester cancelled first."""
        if not fetch.wait_ready(cancelled):
            request.detail = "cancelled before the PACS answered"
            raise PacsUnavailable(request.detail)
        if fetch.total is None or (fetch.error and not fetch.total):
            request.detail = fetch.error or "the PACS gave no count"
            raise PacsUnavailable(request.detail)
        request.detail = fetch.error
        return fetch.total

    def _fetch(self, identifier: Dataset, model: str) -> Fetch:
        return Fetch(self.upstream, identifier, model, mode=self.query.retrieve,
                     inboxes=self.inboxes, move_ae_title=self.query.move_ae_title,
                     engine=self.engine).start()

    def on_sent(self, event: evt.Event) -> None:
        """EVT_DIMSE_SENT: a final response ends its request: the event."""
        command = getattr(event.message, "command_set", None)
        if command is None:
            return
        operation = FINAL_RESPONSES.get(int(command.get("CommandField", 0) or 0))
        code = command.get("Status")
        if operation is None or code is None or int(code) in PENDING:
            return
        with self._lock:
            request = self._requests.pop(
                (id(event.assoc), int(command.get("MessageIDBeingRespondedTo", 0) or 0)), None)
        if request is None:
            return
        comment = str(command.get("ErrorComment", "") or "")
        self._emit(request, f"0x{int(code):04X}", request.detail or comment, command)

    def on_close(self, event: evt.Event) -> None:
        """A requester gone before its final response: its requests end as aborted."""
        with self._lock:
            ended = [self._requests.pop(key) for key in list(self._requests)
                     if key[0] == id(event.assoc)]
        for request in ended:
            self._emit(request, "aborted", request.detail or "the association ended first",
                       Dataset())

    def _emit(self, request: Request, code: str, detail: str, command: Dataset) -> None:
        r = request
        if r.operation == "C-FIND":
            self.events.emit(Queried(requester=r.requester, host=r.host, level=r.level,
                                     keys=r.keys, key_names=r.key_names, status=code,
                                     detail=detail, matches=r.matches))
            return

        def count(what: str) -> int:
            return int(command.get(f"NumberOf{what}Suboperations", 0) or 0)

        self.events.emit(Retrieved(requester=r.requester, host=r.host, level=r.level,
                                   keys=r.keys, key_names=r.key_names, status=code,
                                   detail=detail, operation=r.operation,
                                   move_destination=r.move_destination,
                                   completed=count("Completed"), failed=count("Failed"),
                                   warning=count("Warning")))


@dataclass
class Services:
    """The services a relay process answers besides storing (None: not configured)."""

    query: QueryRetrieve | None = None
    commitment: StorageCommitment | None = None


class ServicesServer:
    """The SCP of the proxy's other services, with the relay's AE title (every engine):
    query/retrieve on [query].port (and the PACS's C-STORE sub-operations when the relay
    retrieves by C-MOVE), storage commitment on [commitment].port; one server when both name
    the same port. The receiver's allow lists and TLS apply; [query].allowed_calling_aets
    narrows who may query. Supervised: `check()` starts it again if it stopped."""

    def __init__(self, config: Config, port: int, *, query: QueryRetrieve | None = None,
                 commitment: StorageCommitment | None = None) -> None:
        self.config = config
        self.port = port
        self.query = query
        self.commitment = commitment
        self.server: Any = None
        self._thread = threading.Thread()
        self.restarts = 0
        self.networks = [ipaddress.ip_network(h, strict=False)
                         for h in config.receiver.allowed_hosts]
        keys = ([] if query is None else ["[query].port"]) + \
            ([] if commitment is None else ["[commitment].port"])
        self.key = " and ".join(keys)

    def _allowed_calling_aets(self) -> list[str]:
        rc = self.config.receiver
        if self.commitment is None:
            assert self.config.query is not None
            return list(self.config.query.allowed_calling_aets or rc.allowed_calling_aets)
        if not rc.allowed_calling_aets:
            return []
        # The PACSes that report on what the relay asked them to commit call in too.
        return [*rc.allowed_calling_aets,
                *(d.ae_title for d in self.config.destinations if d.commitment)]

    def _make_ae(self) -> AE:
        rc = self.config.receiver
        ae = AE(ae_title=rc.ae_title)
        if self.query is not None:
            QueryRetrieve.add_contexts(ae, storage=True)
        if self.commitment is not None:
            self.commitment.add_contexts(ae)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        if self.query is not None and self.query.engine is not None:
            setattr(ae, SERVE_MOVE, self.query.serve_move)  # see relay.services.move
        ae.require_called_aet = (self.query is None
                                 or not self.query.answers_two_titles(rc.ae_title))
        ae.require_calling_aet = self._allowed_calling_aets()
        ae.maximum_associations = rc.max_associations
        ae.network_timeout = rc.idle_timeout
        ae.acse_timeout = max(1.0, min(10.0, rc.idle_timeout / 2))
        ae.dimse_timeout = rc.request_timeout
        return ae

    def on_conn_open(self, event: evt.Event) -> None:
        open_connection(event, event.assoc.acse_timeout, self.config.receiver.idle_timeout)

    def on_requested(self, event: evt.Event) -> None:
        if refused_host(event, self.networks):
            return
        own = self.config.receiver.ae_title
        if self.query is not None:
            if self.query.answers_two_titles(own) and self.query.refuse_unknown_called_ae(
                    event, own):
                return
            if self.commitment is not None:
                self.query.drop_contexts_if_not_allowed(event)
        prefer_requestor_syntax(event)

    def on_store(self, event: evt.Event) -> int:
        """Only the PACS's sub-operations of the relay's own C-MOVE are taken here: new
        studies go to [receiver].port."""
        accepted = None if self.query is None else self.query.inboxes.accept(
            event, only_inbox=True)
        if accepted is None:
            log.warning("C-STORE from %s on %s refused: no retrieve is waiting for it (send "
                        "new studies to [receiver].port %d)",
                        shown(event.assoc.requestor.ae_title), self.key,
                        self.config.receiver.port)
            return STATUS_CANNOT_UNDERSTAND
        return accepted

    def start(self) -> None:
        rc = self.config.receiver
        address = (rc.host, self.port)
        handlers: list[tuple[Any, Any]] = [(evt.EVT_CONN_OPEN, self.on_conn_open),
                                           (evt.EVT_REQUESTED, self.on_requested)]
        if self.query is not None:
            self.query.start()
            handlers += [*self.query.handlers(), (evt.EVT_C_STORE, self.on_store)]
        if self.commitment is not None:
            handlers += self.commitment.handlers()
        ae = self._make_ae()
        try:
            self.server = ae.make_server(
                address, evt_handlers=handlers, server_class=ThreadedAssociationServer,
                contexts=cheap_to_copy(ae.supported_contexts),
                ssl_context=server_context(rc.tls) if rc.tls else None)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"{self.key} {address[1]} on {address[0]} is "
                              f"already in use (change {self.key})") from None
            raise
        # Served from our own thread (supervised: check()), changed before it serves.
        accept_tls_later(self.server)
        self._thread = serve(ae, self.server, "services")
        if self.query is not None:
            assert self.config.query is not None
            log.info("query/retrieve listening as %s on %s:%d (answered by %s, retrieving "
                     "by %s)", rc.ae_title, *address, self.query.upstream.describe(),
                     "C-GET" if self.config.query.retrieve == "get" else
                     f"C-MOVE to {self.config.query.move_ae_title}")
        if self.commitment is not None:
            log.info("storage commitment listening as %s on %s:%d", rc.ae_title, *address)

    def check(self) -> None:
        """Start the SCP again if its server thread is gone (its loop raised)."""
        if self.server is None or self._thread.is_alive():
            return
        log.error("%s SCP stopped: starting it again", self.key)
        self.restarts += 1
        self.server.server_close()
        self.server.ae._servers.remove(self.server)
        self.server = None
        self.start()

    def stop(self) -> None:
        if self.server is not None:
            shut_down(self.server)
            self.server = None


def services_servers(config: Config, services: Services) -> list[ServicesServer]:
    """One server per port: query/retrieve and storage commitment share one where
    [query].port and [commitment].port are the same."""
    ports: dict[int, dict[str, Any]] = {}
    if services.query is not None and config.query is not None:
        ports.setdefault(config.query.port, {})["query"] = services.query
    if services.commitment is not None and config.commitment is not None:
        ports.setdefault(config.commitment.port, {})["commitment"] = services.commitment
    return [ServicesServer(config, port, **kinds) for port, kinds in ports.items()]

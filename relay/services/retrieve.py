"""C-GET and C-MOVE through the relay, in two halves that overlap: a Fetch brings the matching
objects from the PACS into a folder of spool/retrieving/ (by C-GET on its own association, or
by C-MOVE to the relay's own AE, whose C-STORE sub-operations land in a move inbox), and
`serve_objects` hands each one to pynetdicom as soon as it is there, to be stored on the
requester's association (C-GET) or to the move destination (C-MOVE). One object is in memory at
a time and each file goes once it is passed on: a study of any size costs a bounded amount of
memory, and the requester sees the counts change as objects go. Nothing retrieved enters the
routing spool."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import random
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import StoragePresentationContexts, _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from relay.ops.logs import shown
from relay.services.find import CANCEL, PENDING
from relay.services.upstream import PacsUnavailable, Upstream
from relay.spool import safe_name
from relay.toolkits.associations import file_head
from relay.toolkits.common import MAX_CONTEXTS, ToolGet

if TYPE_CHECKING:
    from relay.config.model import Destination
    from relay.send.results import SendResult

log = logging.getLogger("relay.services")

RETRIEVING = "retrieving"  # spool/retrieving/: objects on their way from the PACS
WARNING_SOME_FAILED = 0xB000  # sub-operations complete, one or more failures
UNABLE_SUB_OPERATIONS = 0xA702  # none could be performed
OUT_OF_RESOURCES = 0xA700
SUCCESS = 0x0000

# The other model of the same root: a C-MOVE asked of the relay may be a C-GET to the PACS.
GET_OF = {PatientRootQueryRetrieveInformationModelMove: PatientRootQueryRetrieveInformationModelGet,
          StudyRootQueryRetrieveInformationModelMove: StudyRootQueryRetrieveInformationModelGet}
MOVE_OF = {get: move for move, get in GET_OF.items()}

# Proposed for each storage class when the relay takes objects by C-GET: the PACS picks one
# per class (uncompressed first, so any PACS can; the common compressed ones so a PACS that
# keeps them so need not decompress).
GET_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                JPEG2000Lossless, JPEG2000, RLELossless]
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]


class ToolkitEngine(Protocol):
    """What query/retrieve uses of the engine (relay.toolkits.base.Engine): its C-GET SCU,
    and its sender for a C-MOVE's objects. A protocol: the toolkits depend on the services
    (the embedded receiver answers them), not the other way round."""

    name: str

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False,
             confirm_each: bool = True) -> Iterator[SendResult]: ...

    def get_by_tool(self, source: Destination, query: Path, model: str, calling_ae: str,
                    folder: Path, timeout: float, storage: list[tuple[str, list[str]]]
                    ) -> ToolGet | None: ...


class StoredObject(Dataset):
    """A retrieved object, by its file. pynetdicom's C-GET and C-MOVE SCPs take only data
    sets to store; decoding each file into one and encoding it again cost most of a
    retrieve's time (measured: bench/query.py). `send_c_store` (patched below) sends this
    one's file as it is instead, in chunks, never decoded."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        # Listed as failed by its UID, if it fails (the file name begins with it: safe_name).
        self.SOPInstanceUID = path.name.split("~", 1)[0]
        self.relay_path = path


_send_c_store = Association.send_c_store


def _send_stored(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    """Association.send_c_store for StoredObject: the file as it is when the association
    accepted its class in its transfer syntax; else decoded, for pynetdicom to convert it
    to one it accepted (between uncompressed syntaxes)."""
    if not isinstance(dataset, StoredObject):
        return _send_c_store(self, dataset, *args, **kwargs)
    try:
        return _send_c_store(self, dataset.relay_path, *args, **kwargs)
    except ValueError:  # no context for it as stored
        return _send_c_store(self, dcmread(dataset.relay_path), *args, **kwargs)


Association.send_c_store = _send_stored
_config.STORE_SEND_CHUNKED_DATASET = True  # files go from disk in chunks, as they are


def get_contexts(model: str) -> tuple[list[PresentationContext], list[Any]]:
    """The contexts and SCP/SCU roles of a C-GET to the PACS: the model, and as many storage
    classes as fit in 128 contexts (pynetdicom's 120 common ones): an object of a class not
    among them is a failed sub-operation (retrieve = "move" has no such limit)."""
    classes = [cx.abstract_syntax for cx in StoragePresentationContexts][:MAX_CONTEXTS - 1]
    contexts = [build_context(model)] + [build_context(c, GET_SYNTAXES) for c in classes]
    return contexts, [build_role(c, scp_role=True) for c in classes if c is not None]


def store_contexts(first: tuple[str, str] | None) -> list[PresentationContext]:
    """The contexts of the association to a C-MOVE destination: the first object's class and
    transfer syntax as it came, then the common storage classes uncompressed."""
    contexts = [build_context(first[0], [first[1]])] if first else []
    for cx in StoragePresentationContexts:
        if len(contexts) >= MAX_CONTEXTS:
            break
        if first is None or cx.abstract_syntax != first[0] or first[1] not in UNCOMPRESSED:
            contexts.append(build_context(cx.abstract_syntax, UNCOMPRESSED))
    return contexts


def write_object(folder: Path, name: str, head: bytes, body: memoryview | bytes) -> Path:
    """A retrieved object, complete under its name only once written (a dot name until)."""
    final = folder / name
    partial = folder / f".{name}.part"
    with open(partial, "wb") as out:
        out.write(head)
        out.write(body)
    os.replace(partial, final)
    return final


class Inboxes:
    """Move inboxes: spool/retrieving/move-<message id>-<pid>/, one per C-MOVE the relay asks
    of the PACS with itself as destination. The PACS's C-STORE sub-operations carry that
    message ID (Move Originator Message ID) to whichever relay process takes them (the
    services SCP or the embedded receiver): the folder is the meeting point.

    Only a C-STORE from the PACS's AE title, naming the relay's calling AE title as the move's
    originator (when it names one), with an open inbox's message ID, is taken: a modality's
    new study, or another archive's C-MOVE to the relay, always goes to the routing spool."""

    def __init__(self, root: Path, pacs_ae: str = "", originator_ae: str = "") -> None:
        self.root = root
        self.pacs_ae = pacs_ae  # the [query] destination's AE title
        self.originator_ae = originator_ae  # [sender].calling_ae_title: who asks the PACS

    def open(self) -> tuple[int, Path]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        while True:
            msg_id = random.randint(1, 65535)  # noqa: S311 - an ID, not a secret
            if any(self.root.glob(f"move-{msg_id}-*")):
                continue
            folder = self.root / f"move-{msg_id}-{os.getpid()}"
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                continue
            return msg_id, folder

    def of(self, msg_id: int | None) -> Path | None:
        """The inbox a sub-operation belongs to: by its Move Originator Message ID, or the
        only one open when the PACS did not say (it should)."""
        pattern = f"move-{msg_id}-*" if msg_id is not None else "move-*"
        found = [p for p in self.root.glob(pattern) if p.is_dir()] if self.root.is_dir() else []
        return found[0] if len(found) == 1 else None

    def accept(self, event: evt.Event, *, only_inbox: bool = False) -> int | None:
        """EVT_C_STORE: store a sub-operation of the relay's own C-MOVE in its inbox (the
        status to answer), or None when it is not one (an ordinary C-STORE). only_inbox: on
        the query/retrieve port, where nothing else is taken, a C-STORE from the PACS that
        names no move (it should) goes to the one inbox open, if only one is."""
        request = event.request
        if str(event.assoc.requestor.ae_title).strip() != self.pacs_ae:
            return None
        originator_ae = str(request.MoveOriginatorApplicationEntityTitle or "").strip()
        if originator_ae and originator_ae != self.originator_ae:
            return None
        originator = request.MoveOriginatorMessageID
        if originator is None and not only_inbox:
            return None
        folder = self.of(int(originator) if originator is not None else None)
        if folder is None:
            return None
        data_set = request.DataSet
        try:
            with data_set.getbuffer() as body:
                write_object(folder, safe_name(request.AffectedSOPInstanceUID),
                             file_head(event), body)
        except OSError as exc:
            log.error("retrieve: cannot keep %s from the PACS (%s)",
                      shown(str(request.AffectedSOPInstanceUID)), exc.strerror or exc)
            return OUT_OF_RESOURCES
        return SUCCESS

    def clean(self) -> None:
        """Folders left by a relay process that is gone (killed while retrieving)."""
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            pid = folder.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this pid runs (a relay process that may hold a folder or a
    transaction)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Fetch:
    """One retrieve from the PACS, in a thread of its own: objects land in a folder and are
    queued as they arrive; the PACS's counts and final status are kept. By C-GET, the
    engine's own toolkit SCU fetches when it has one that fits (DCMTK's getscu, dcm4che's
    in its JVM: the objects never pass through Python), else pynetdicom."""

    _serial = itertools.count(1)

    def __init__(self, upstream: Upstream, identifier: Dataset, model: str, *, mode: str,
                 inboxes: Inboxes, move_ae_title: str,
                 engine: ToolkitEngine | None = None) -> None:
        self.upstream = upstream
        self.engine = engine
        self._tool: ToolGet | None = None
        self.identifier = identifier
        self.mode = mode
        self.inboxes = inboxes
        self.move_ae_title = move_ae_title
        if mode == "get":
            self.model = GET_OF.get(model, model)
            self.msg_id = 1
            self.folder = inboxes.root / f"get-{next(self._serial)}-{os.getpid()}"
        else:
            self.model = MOVE_OF.get(model, model)
            self.msg_id, self.folder = inboxes.open()
        self.total: int | None = None
        self.error = ""  # why the PACS gave nothing (unreachable, refused, broke off)
        self.failed = 0  # sub-operations the PACS counted failed
        self.failed_uids: list[str] = []
        self.first: tuple[str, str] | None = None  # (SOP class, transfer syntax) of the first
        self._arrived: queue.Queue[Path] = queue.Queue()
        self._seen: set[str] = set()
        self.uids: dict[Path, str] = {}  # the SOP Instance UID of each object queued
        self._ready = threading.Event()  # the total is known, or the fetch is over
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="retrieve", daemon=True)

    def start(self) -> Fetch:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._thread.start()
        return self

    def wait_ready(self, cancelled: Callable[[], bool]) -> bool:
        """Wait until the number of objects is known (False: cancelled meanwhile)."""
        while not self._ready.wait(0.1):
            if cancelled():
                self.cancel()
                return False
        return True

    def next_object(self, timeout: float) -> Path | None:
        try:
            return self._arrived.get(timeout=timeout)
        except queue.Empty:
            return None

    def arrived(self, timeout: float) -> list[Path]:
        """Every object queued now, waiting up to `timeout` for a first one."""
        first = self.next_object(timeout)
        if first is None:
            return []
        taken = [first]
        with contextlib.suppress(queue.Empty):
            while True:
                taken.append(self._arrived.get_nowait())
        return taken

    @property
    def finished(self) -> bool:
        """The PACS has answered its last and every object it sent is queued."""
        return self._done.is_set() and self._arrived.empty()

    def cancel(self) -> None:
        self._cancel.set()
        if self._tool is not None:
            self._tool.stop()

    def close(self) -> None:
        """Stop (a C-CANCEL to the PACS if it is still sending) and remove the folder."""
        self.cancel()
        if self._thread.is_alive():
            self._thread.join(timeout=self.upstream.timeout + 5)
        shutil.rmtree(self.folder, ignore_errors=True)

    # --- the fetching thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self.mode == "get" and self._get_by_tool():
                return
            if self.mode == "get":
                contexts, roles = get_contexts(self.model)
                assoc = self.upstream.associate(contexts, [(evt.EVT_C_STORE, self._on_store)],
                                                roles)
                responses = assoc.send_c_get(self.identifier, self.model, msg_id=self.msg_id)
            else:
                assoc = self.upstream.associate([build_context(self.model)])
                responses = assoc.send_c_move(self.identifier, self.move_ae_title, self.model,
                                              msg_id=self.msg_id)
            try:
                self._follow(assoc, responses)
            finally:
                if assoc.is_established:
                    assoc.release()
        except PacsUnavailable as exc:
            self.error = str(exc)
        except (OSError, ValueError, RuntimeError) as exc:
            self.error = f"retrieve from {self.upstream.describe()} failed: {exc}"
        finally:
            if self.error:
                log.error("retrieve: %s", shown(self.error))
            self._collect()
            self._done.set()
            self._ready.set()

    def _get_by_tool(self) -> bool:
        """The C-GET by the engine's own SCU; False when it has none that fits."""
        if self.engine is None:
            return False
        query = self.folder / ".query.dcm"  # the identifier, as the tool reads it
        dcmwrite(query, self.identifier, implicit_vr=True, little_endian=True)
        source = self.upstream.destination
        try:
            contexts, _ = get_contexts(self.model)
            storage = [(str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax])
                       for cx in contexts[1:]]
            tool = self.engine.get_by_tool(source, query, self.model, self.upstream.calling_ae,
                                           self.folder, self.upstream.timeout, storage)
        # The tool gone since start-up; TLS files; a confinement the kernel refused.
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            self.error = f"cannot run the {self.engine.name} engine's C-GET SCU: {why}"
            return True
        if tool is None:
            return False
        log.info("retrieve from %s by the %s engine's own C-GET SCU", self.upstream.describe(),
                 self.engine.name)
        self._tool = tool
        if self._cancel.is_set():
            tool.stop()
        final: int | None = None
        for update in tool:
            if update.path is not None:
                self._queue(update.path, None, update.uid)
            elif update.error:
                if not self._cancel.is_set():  # else: the end of the stop() below
                    self.error = f"retrieve from {self.upstream.describe()} failed: " \
                                 f"{update.error}"
            elif update.status is not None and not self._response(update.status, [
                    update.remaining, update.completed, update.failed, update.warning]):
                final = update.status
        if self._cancel.is_set() and final in (None, CANCEL):
            log.info("retrieve cancelled: the %s engine's C-GET from %s stopped (%s)",
                     self.engine.name, self.upstream.describe(),
                     "cancelled by the PACS" if final == CANCEL else "association ended")
        return True

    def _follow(self, assoc: Any, responses: Iterator[tuple[Dataset, Dataset | None]]) -> None:
        cancel_sent = False
        for rsp, identifier in responses:
            if "Status" not in rsp:
                self.error = (f"{self.upstream.describe()} stopped answering (timed out or "
                              "aborted)")
                return
            code = int(rsp.Status)
            counts = [int(rsp.get(k) or 0) for k in (
                "NumberOfRemainingSuboperations", "NumberOfCompletedSuboperations",
                "NumberOfFailedSuboperations", "NumberOfWarningSuboperations")]
            self._collect()
            if self._response(code, counts):
                if self._cancel.is_set() and not cancel_sent and assoc.accepted_contexts:
                    log.info("retrieve cancelled: C-CANCEL passed on to %s",
                             self.upstream.describe())
                    assoc.send_c_cancel(self.msg_id, assoc.accepted_contexts[0].context_id)
                    cancel_sent = True
                continue
            if identifier is not None and "FailedSOPInstanceUIDList" in identifier:
                uids = identifier.FailedSOPInstanceUIDList
                self.failed_uids = [str(u) for u in (uids if isinstance(uids, list) else [uids])
                                    if u]
            return
        self.error = f"{self.upstream.describe()} gave no final response"

    def _response(self, code: int, counts: list[int]) -> bool:
        """A C-GET or C-MOVE response of the PACS (counts: remaining, completed, failed,
        warning): the total from the first pending one, the failures and status from the
        final one. True while pending."""
        if code in PENDING:
            if self.total is None:
                self.total = sum(counts)
                self._ready.set()
            return True
        self.failed = counts[2]
        if self.total is None:
            self.total = counts[1] + counts[2] + counts[3]
        if code not in (SUCCESS, WARNING_SOME_FAILED, CANCEL) and not self._seen:
            self.error = f"{self.upstream.describe()} answered 0x{code:04X}"
        return False

    def _on_store(self, event: evt.Event) -> int:
        """EVT_C_STORE on the C-GET association: a matching object from the PACS."""
        request = event.request
        try:
            with request.DataSet.getbuffer() as body:
                path = write_object(self.folder, safe_name(request.AffectedSOPInstanceUID),
                                    file_head(event), body)
        except OSError as exc:
            log.error("retrieve: cannot keep %s from the PACS (%s)",
                      shown(str(request.AffectedSOPInstanceUID)), exc.strerror or exc)
            return OUT_OF_RESOURCES
        self._queue(path, (str(request.AffectedSOPClassUID),
                           str(event.context.transfer_syntax)),
                    str(request.AffectedSOPInstanceUID))
        return SUCCESS

    def _collect(self) -> None:
        """Move mode: queue what the inbox received since last time."""
        if self.mode != "move" or not self.folder.is_dir():
            return
        new = [p for p in self.folder.iterdir()
               if not p.name.startswith(".") and p.name not in self._seen]
        for path in sorted(new, key=_arrival):
            if path.name not in self._seen:
                first = None
                if self.first is None:
                    with contextlib.suppress(Exception):
                        meta = dcmread(path, stop_before_pixels=True).file_meta
                        first = (str(meta.MediaStorageSOPClassUID),
                                 str(meta.TransferSyntaxUID))
                self._queue(path, first, path.name.split("~", 1)[0])

    def _queue(self, path: Path, first: tuple[str, str] | None, uid: str) -> None:
        self._seen.add(path.name)
        self.uids[path] = uid
        if self.first is None:
            self.first = first
        self._arrived.put(path)


def _arrival(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def serve_objects(fetch: Fetch, cancelled: Callable[[], bool]
                  ) -> Iterator[tuple[int, Dataset | None]]:
    """After the count: (Pending, data set) for each object as it lands, then the final
    status. pynetdicom stores each data set and counts the sub-operation; objects the PACS
    did not deliver count as failed in the final response."""
    served = 0
    sent: Path | None = None  # stored by pynetdicom between our yields: removed after
    try:
        while True:
            if sent is not None:
                sent.unlink(missing_ok=True)
                sent = None
            if cancelled():
                fetch.cancel()
                yield CANCEL, None
                return
            if fetch.total is not None and served >= fetch.total:
                # pynetdicom sent the final response after the last sub-operation.
                return
            sent = fetch.next_object(0.1)
            if sent is None:
                if fetch.finished:
                    break
                continue
            served += 1
            yield PENDING[0], StoredObject(sent)
    finally:
        if sent is not None:
            sent.unlink(missing_ok=True)
    left = (fetch.total or 0) - served
    if left > 0 or fetch.failed or fetch.error:
        failed = Dataset()
        failed.FailedSOPInstanceUIDList = fetch.failed_uids
        yield (WARNING_SOME_FAILED if served else UNABLE_SUB_OPERATIONS), failed
        return
    yield SUCCESS, None

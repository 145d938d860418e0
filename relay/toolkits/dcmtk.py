"""The DCMTK engine (Debian package `dcmtk`): storescp receives, dcmsend sends, echoscu echoes.

Facts it is built on (measured here, see design.md):
- DCMTK leaves Nagle on unless the environment has TCP_NODELAY=1: every subprocess gets it.
- pynetdicom installs `storescp`/`storescu` scripts that shadow DCMTK's on a venv PATH, so
  executables are taken from `toolkit.dcmtk_bin`, never found by bare name.
- storescp writes each object in place under its final name, and IN_CLOSE_WRITE also fires
  when it dies mid-write. So it writes into spool/receiving/ and, once an object is complete,
  `--exec-on-reception` with `--exec-sync` leaves a marker `<name>.done` beside it; the
  receiver's hand-over thread then moves the object into incoming/. The mark comes AFTER the
  C-STORE response (storescp.cc runs the command once DIMSE_storeProvider has answered;
  measured: a storescp killed at the right instant had acknowledged an object it had not
  marked). storescp answers only once the object is written whole, so an object without its
  mark after storescp died is handed over when whole (it may have been acknowledged: a
  duplicate at worst) and quarantined only when cut short (never acknowledged).
  The marker is written by a shell builtin (`: > file`): the command runs through /bin/sh
  (DCMTK's mechanism), and one more process per object (`mv`) had capped the receiver at
  ~320 objects/s where storescp alone takes ~1,000/s (measured: the marker ~490/s).
  No peer text reaches the shell: with `--unique-filenames` the file name (#f) is made by
  DCMTK from a UID it generates itself ("CT.X.1.2.276…"), and DCMTK maps anything outside
  [A-Za-z0-9._] to '_' in any case.
- dcmsend keeps going after a failure (--no-halt), never decompresses (--decompress-never,
  so each file keeps its transfer syntax), and its report file gives a status per file.
  Its exit code alone proves nothing about single files. The report comes when it ends, so
  successes are read from its --debug output as they arrive (the file is named before each
  request, the status printed after its response): a relay killed mid-batch sends again
  only what was not confirmed.
- dcmsend has no TLS. To a TLS destination storescu sends (+tls/+tla). Left to itself it
  proposes only uncompressed syntaxes and, having no codecs, fails every compressed object;
  so it gets an association profile (--config-file) proposing exactly each object's own
  (SOP class, transfer syntax). Per-file statuses come from its debug log ("Sending file:",
  then "DIMSE Status : 0x…"), matched in order to the files given.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from inotify_simple import flags
from pydicom.filereader import read_partial
from pydicom.tag import BaseTag

from relay.edit.editor import BadInput, read_dicom
from relay.edit.scan import leading_values
from relay.receive import landlock
from relay.receive.inotify import WakeableINotify
from relay.receive.supervisor import SupervisedReceiver, ToolLines, run_tool
from relay.receive.warden import Warden
from relay.send.results import (
    Context,
    DestinationUnavailable,
    Outcome,
    SendResult,
    ToolFailure,
    classify_status,
    local_failures,
    retry_all,
)
from relay.toolkits.base import Engine, Receiver
from relay.toolkits.common import (
    GetUpdate,
    context_groups,
    is_uid,
    last_lines,
    mark_in_flight,
    tool_timeout,
)
from relay.toolkits.embedded import EmbeddedEngine

if TYPE_CHECKING:
    from relay.config.model import Config, Destination, TLSConfig
    from relay.services.scp import Services
    from relay.spool import Spool

log = logging.getLogger("relay.dcmtk")

_ELF = b"\x7fELF"


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def find_tool(bin_dir: Path, name: str) -> Path:
    """A DCMTK executable in bin_dir; refuses a Python console script of the same name."""
    path = bin_dir / name
    try:
        with open(path, "rb") as fp:
            head = fp.read(64)
    except OSError:
        raise FileNotFoundError(f"DCMTK's {name} not found in {bin_dir} "
                                "(install Debian's dcmtk or set [toolkit].dcmtk_bin)") from None
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"{path} is not executable")
    if not head.startswith(_ELF) and b"python" in head.split(b"\n", 1)[0]:
        raise FileNotFoundError(f"{path} is a Python script (pynetdicom's {name}?), not "
                                "DCMTK's: set [toolkit].dcmtk_bin to DCMTK's folder")
    return path


def tls_args(tls: TLSConfig | None) -> list[str]:
    """DCMTK's DICOM TLS options (storescp, storescu, echoscu) for a [tls] table: our
    certificate if we have one (a receiver always does; a destination may use anonymous TLS),
    the CA the peer's certificate must chain to. DCMTK checks the chain, not that the
    certificate names the host (the embedded engine checks both)."""
    if tls is None:
        return []
    if tls.certificate is not None and tls.private_key is not None:
        args = ["--enable-tls", str(tls.private_key), str(tls.certificate), "--null-passwd"]
    else:
        args = ["--anonymous-tls"]
    if tls.ca is not None:
        args += ["--add-cert-file", str(tls.ca)]
    args.append("--require-peer-cert" if tls.require_peer_certificate else "--ignore-peer-cert")
    return args


DONE_MARKER = ".done"  # receiving/<name>.done: storescp finished and answered <name>


# storescp's log lines, each with the pid of the process (a child per association) and its
# level: the receiver learns from them which children have negotiated (relay.receive.warden).
LOG_CONFIG = """log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %i %p: %m%n
"""
_LOG_LINE_RE = re.compile(r"^(\d+) (TRACE|DEBUG|INFO|WARN|ERROR|FATAL): ")
_NEGOTIATED_RE = re.compile(r"^(\d+) INFO: Association Received")
_LOG_LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.DEBUG,
               "WARN": logging.WARNING, "ERROR": logging.ERROR, "FATAL": logging.CRITICAL}


def storescp_level(line: str, previous: int) -> int:
    """The level of one storescp line in our log: its own, but its INFO (each association
    and object) at DEBUG, as storescp without --verbose was; a line without a header
    continues the one before."""
    found = _LOG_LINE_RE.match(line)
    return previous if found is None else _LOG_LEVELS[found.group(2)]


def storescp_argv(storescp: Path, ae_title: str, port: int, receiving: Path,
                  tls: TLSConfig | None = None, idle_timeout: float = 60,
                  request_timeout: float = 60, log_config: Path | None = None) -> list[str]:
    mark = f": > {shlex.quote(str(receiving))}/#f{DONE_MARKER}"
    return [
        str(storescp), *tls_args(tls),
        *(["--log-config", str(log_config)] if log_config is not None else []),
        "--aetitle", ae_title,
        "--accept-all",          # every transfer syntax DCMTK knows: compressed stay compressed
        "--promiscuous",         # storage SOP classes DCMTK does not know yet, too
        "--fork",                # one process per association: modalities do not queue
        # Streamed to the file exactly as received, never decoded and re-encoded: the bytes
        # the modality sent, and measured 575 -> 746 objects/s (small), 301 -> 747 MB/s.
        "--bit-preserving",
        "--output-directory", str(receiving),
        "--unique-filenames",    # DCMTK-made names: no peer text, no overwrite on resend
        "--exec-on-reception", mark,
        "--exec-sync",           # marked before the next request is read
        "--socket-timeout", str(max(1, int(idle_timeout))),
        "--acse-timeout", str(max(1, int(idle_timeout / 2))),
        "--dimse-timeout", str(max(1, int(request_timeout))),
        str(port),
    ]


def dcmsend_argv(dcmsend: Path, files: list[Path], destination: Destination, calling_ae: str,
                 timeout: float, report: Path, each_response: bool = True) -> list[str]:
    """each_response: --debug, each file's name before its request and its response's
    status after it, read while it runs (~33 lines per object); else --verbose (2 lines per
    object, naming no file: the results are the report's, at the end; measured, dcmsend
    used a quarter less CPU). --verbose-pc: the A-ASSOCIATE-AC (which contexts were
    refused), either way."""
    seconds = str(max(1, int(timeout)))
    return [
        str(dcmsend),
        "--aetitle", calling_ae,
        "--call", destination.ae_title,
        "--no-halt",
        "--debug" if each_response else "--verbose", "--verbose-pc",
        "--decompress-never",
        "--no-uid-checks",       # the PACS judges the UIDs, not the sender
        "--timeout", seconds,
        "--acse-timeout", seconds,
        "--dimse-timeout", seconds,
        "--create-report-file", str(report),
        destination.host, str(destination.port),
        *[str(f) for f in files],
    ]


_STATUS_RE = re.compile(r"^0x([0-9A-Fa-f]{4})")
_CONTEXT_RE = re.compile(r"Context ID:\s+(\d+) \(([^)]*)\)")


class Answer(NamedTuple):
    """What a DCMTK tool's report or log says of one file."""

    outcome: Outcome
    status: int | None
    detail: str
    refused_syntax: bool = False  # the peer accepted no presentation context for it


def reached_network(output: str) -> bool:
    """Whether a DCMTK network tool run with --verbose got as far as asking for an
    association (dcmsend, storescu and echoscu all print this line before connecting)."""
    return "Requesting Association" in output


_DCMSEND_FILE_RE = re.compile(r"^D: sending SOP instance from file: (.*)$")


def requests_and_responses(output: Iterable[str], files: list[Path]
                           ) -> Iterator[tuple[Path | None, int | None]]:
    """dcmsend's debug output as it runs: (file, None) as it names the file before each
    request ("sending SOP instance from file: …"), then (that file, status) as the
    response's status is printed (file None for a name that is not one of `files`)."""
    by_name = {str(path): path for path in files}
    current: Path | None = None
    for line in output:
        if (named := _DCMSEND_FILE_RE.match(line)) is not None:
            current = by_name.get(named.group(1))
            yield current, None
        elif (status := _DIMSE_STATUS_RE.match(line)) is not None and current is not None:
            yield current, int(status.group(1), 16)
            current = None


def successes_as_sent(output: Iterable[str], files: list[Path]) -> Iterator[Path]:
    """The files dcmsend's debug output confirms, as their C-STORE responses arrive. Only a
    success (0x0000) of the file just named counts; every other outcome is read from the
    report at the end."""
    for path, status in requests_and_responses(output, files):
        if status == 0 and path is not None:
            yield path


def on_the_wire(output: Iterable[str], files: list[Path]) -> Path | None:
    """The file dcmsend named last and got no response for: the one on the wire when it
    stopped (None when every file it named was answered)."""
    last: Path | None = None
    for path, status in requests_and_responses(output, files):
        last = path if status is None else None
    return last


def refused_contexts(output: str) -> dict[tuple[int, int], str]:
    """(association number, context ID) → why the peer refused it, from the A-ASSOCIATE-AC
    sections dcmsend prints with --verbose-pc (and --verbose or --debug)."""
    refused: dict[tuple[int, int], str] = {}
    association = 0
    in_ac = False
    for line in output.splitlines():
        if "BEGIN A-ASSOCIATE-AC" in line:
            association += 1
            in_ac = True
        elif "END A-ASSOCIATE-AC" in line:
            in_ac = False
        elif in_ac and (match := _CONTEXT_RE.search(line)) and match.group(2) != "Accepted":
            refused[(association, int(match.group(1)))] = match.group(2)
    return refused


def parse_dcmsend_report(text: str, output: str = "") -> dict[str, Answer]:
    """Filename → its Answer from dcmsend's --create-report-file (and its verbose output,
    which says which presentation contexts the peer refused)."""
    refused = refused_contexts(output)
    results: dict[str, Answer] = {}
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            key, sep, value = line.partition(" : ")
            if sep:
                fields[key.strip()] = value.strip()
        name, status = fields.get("Filename"), fields.get("DIMSE Status")
        if name is None or status is None:
            continue
        match = _STATUS_RE.match(status)
        context = (int(fields.get("Association", "0") or 0),
                   int(fields.get("Pres. Context", "0") or 0))
        if match:
            code = int(match.group(1), 16)
            results[name] = Answer(classify_status(code), code, status)
        elif context in refused:
            # The peer answered and refused this SOP class / transfer syntax: sending it again
            # will not change that (and must not hold up the rest of the queue).
            results[name] = Answer(Outcome.FAILED, None, f"destination refused the "
                                   f"presentation context ({refused[context]})", True)
        elif status == "<not sent>":
            results[name] = Answer(Outcome.RETRY, None, "not sent (association ended before it)")
        else:  # <no acceptable presentation context>, <invalid dataset pointer>
            results[name] = Answer(Outcome.FAILED, None, status.strip("<>"),
                                   status == "<no acceptable presentation context>")
    return results


SOP_CLASS_UID, SOP_INSTANCE_UID = 0x00080016, 0x00080018


def _after_sop_uids(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) > SOP_INSTANCE_UID


def _read_uids(path: Path) -> tuple[str, str, str] | str:
    """(SOP Class UID, SOP Instance UID, transfer syntax UID) as the DCMTK tools need them, in
    the data set itself (some files only have them in the file meta), or why the file cannot
    be sent. This runs for every object sent: the first bytes usually tell (relay.scan);
    pydicom reads the rest."""
    quick = leading_values(path, {SOP_CLASS_UID, SOP_INSTANCE_UID})
    if quick is not None:
        syntax, values = quick
        uids = [values.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")
                for tag in (SOP_CLASS_UID, SOP_INSTANCE_UID)]
        if all(uids):
            return uids[0], uids[1], syntax
    try:
        with open(path, "rb") as fp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_partial(fp, stop_when=_after_sop_uids)
    except Exception as exc:  # noqa: BLE001 - unreadable: the DCMTK tools cannot read it either
        return f"unreadable: {exc}"
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
    if missing:
        return f"the data set lacks {', '.join(missing)}"
    return (str(ds.SOPClassUID), str(ds.SOPInstanceUID),
            str(getattr(ds.file_meta, "TransferSyntaxUID", "") or ""))


def _sendable(path: Path) -> str | None:
    """Why dcmsend cannot send this file at all, or None (it judges no UID's form:
    --no-uid-checks leaves that to the PACS)."""
    found = _read_uids(path)
    return found if isinstance(found, str) else None


def _presentation(path: Path) -> Context | str:
    """(SOP Class UID, transfer syntax UID) the file goes as, or why it cannot be sent."""
    found = _read_uids(path)
    if isinstance(found, str):
        return found
    sop_class, _, syntax = found
    return sop_class, syntax


def association_profile(contexts: list[Context], name: str = "Relay") -> str:
    """A DCMTK association configuration (storescu --config-file FILE Relay) that proposes
    each (SOP class, transfer syntax) pair in a presentation context of its own: every object
    goes in the syntax it arrived in, compressed or not."""
    syntaxes = sorted({ts for _, ts in contexts})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", f"[{name}]"]
    for i, (sop_class, ts) in enumerate(contexts, 1):
        lines.append(f"PresentationContext{i} = {sop_class}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", f"[{name}]", f"PresentationContexts = {name}"]
    return "\n".join(lines) + "\n"


def storescu_argv(storescu: Path, files: list[Path], destination: Destination,
                  calling_ae: str, timeout: float, profile: Path) -> list[str]:
    """storescu over TLS: one association, all files, statuses in its debug log."""
    assert destination.tls is not None
    seconds = str(max(1, int(timeout)))
    return [
        str(storescu),
        "--debug",               # the DIMSE status of every C-STORE response
        "--aetitle", calling_ae,
        "--call", destination.ae_title,
        "--no-halt",
        "--config-file", str(profile), "Relay",
        "--timeout", seconds,
        "--acse-timeout", seconds,
        "--dimse-timeout", seconds,
        *tls_args(destination.tls),
        destination.host, str(destination.port),
        *[str(f) for f in files],
    ]


# How storescu says the association broke under the file it was sending.
_ABORT_MARKERS = ("Peer aborted", "Failed receiving DIMSE response", "DIMSE Failed to send",
                  "Association Aborted")
_SENDING_RE = re.compile(r"^I: Sending file: (.*)$")
_DIMSE_STATUS_RE = re.compile(r"^D: DIMSE Status\s*: 0x([0-9A-Fa-f]{4})(?::\s*(.*))?$")


def parse_storescu_log(output: str) -> tuple[bool, list[tuple[str, Answer]]]:
    """(association accepted?, [(file, its Answer)] in the order storescu sent them) from
    storescu --debug output."""
    accepted = False
    results: list[tuple[str, Answer]] = []
    current: str | None = None
    status: int | None = None
    detail = ""
    refused = False

    def close() -> None:
        if current is None:
            return
        if status is not None:
            results.append((current, Answer(classify_status(status), status, detail)))
        elif refused:
            # The peer answered and refused this SOP class / transfer syntax: sending it again
            # will not change that (and must not hold up the rest of the queue).
            results.append((current, Answer(Outcome.FAILED, None, detail, True)))
        else:
            results.append((current, Answer(Outcome.RETRY, None,
                                            detail or "no C-STORE response")))

    for line in output.splitlines():
        if line.startswith("I: Association Accepted"):
            accepted = True
        elif match := _SENDING_RE.match(line):
            close()
            current, status, detail, refused = match.group(1), None, "", False
        elif current is None:
            continue
        elif match := _DIMSE_STATUS_RE.match(line):
            status = int(match.group(1), 16)
            detail = f"0x{status:04X} {match.group(2) or ''}".strip()
        elif line.startswith("E: No presentation context for"):
            refused = True
            detail = "destination refused the presentation context (" + line[3:] + ")"
        elif line.startswith("E: ") and not detail and "Store Failed" not in line:
            detail = line[3:]
    close()
    return accepted, results


class DcmtkReceiver(SupervisedReceiver, Receiver):
    toolkit = "DCMTK"

    def __init__(self, engine: DcmtkEngine, config: Config, spool: Spool) -> None:
        rc = config.receiver
        if rc.host not in ("0.0.0.0", "::", ""):  # noqa: S104
            log.warning("DCMTK's storescp cannot bind to one address: it listens on all, "
                        "not only %s", rc.host)
        self.spool = spool
        self._private = Path(tempfile.mkdtemp(prefix="dicom-relay-dcmtk-"))
        weakref.finalize(self, shutil.rmtree, self._private, True)
        log_config = self._private / "storescp-log.cfg"
        log_config.write_text(LOG_CONFIG)
        argv = storescp_argv(find_tool(engine.bin_dir, "storescp"), rc.ae_title, rc.port,
                             spool.receiving, rc.tls, rc.idle_timeout, rc.request_timeout,
                             log_config)
        self._stop = threading.Event()
        self._handover: threading.Thread | None = None
        self._inotify: WakeableINotify | None = None
        super().__init__(config, argv, host="0.0.0.0", env=dcmtk_env(),  # noqa: S104
                         line_level=storescp_level, on_line=self._on_line,
                         writes_to=spool.receiving,
                         # storescp marks an object done through a shell it runs before it
                         # answers: a SIGTERM that killed that shell first let the answer go
                         # out with no mark (acknowledged, then taken for unfinished). Frozen,
                         # then killed, nothing of it goes on once a part of it is gone.
                         freeze_first=True)
        # storescp forks a process per association and limits none: the warden does.
        self.warden = Warden(lambda: self.supervisor.pid,
                             negotiation=max(1.0, min(10.0, rc.idle_timeout / 2)),
                             per_host=rc.per_host, total=rc.max_associations)

    def _on_line(self, line: str) -> None:
        found = _NEGOTIATED_RE.match(line)
        if found:
            self.warden.negotiated(int(found.group(1)))

    def start(self) -> None:
        self.spool.receiving.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.spool.incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Watch before the first sweep and start: no marker can slip between the two.
        self._inotify = WakeableINotify()
        self._inotify.add_watch(str(self.spool.receiving), flags.CLOSE_WRITE)
        self._stop.clear()
        self._handover = threading.Thread(target=self._handover_loop, name="dcmtk-handover",
                                          daemon=True)
        self._handover.start()
        super().start()
        self.warden.start()

    def stop(self) -> None:
        self.warden.stop()
        super().stop()
        self._stop.set()
        if self._inotify is not None:
            self._inotify.wake()
        if self._handover is not None:
            self._handover.join(timeout=10)
            self._handover = None
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._hand_over_marked()  # what storescp finished last

    def _handover_loop(self) -> None:
        assert self._inotify is not None
        inotify = self._inotify
        while not self._stop.is_set():
            for event in inotify.read(500):
                if event.name.endswith(DONE_MARKER):
                    self._hand_over(self.spool.receiving / event.name)
                elif event.mask & flags.Q_OVERFLOW:
                    self._hand_over_marked()

    def _hand_over(self, marker: Path) -> None:
        """storescp finished this object and is answering success: into incoming/ with it."""
        name = marker.name[:-len(DONE_MARKER)]
        # Not found: already handed over (by the sweep), or the marker is an orphan.
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.spool.receiving / name, self.spool.incoming / name)
        marker.unlink(missing_ok=True)

    def _hand_over_marked(self) -> None:
        if self.spool.receiving.is_dir():
            for marker in self.spool.receiving.glob(f"*{DONE_MARKER}"):
                self._hand_over(marker)

    def sweep(self) -> None:
        """Before each (re)start: objects storescp finished go on; of the others, those
        whole go on too (storescp may have answered for one before it died, without the mark
        that comes after the answer), those cut short were never acknowledged and are
        quarantined."""
        self._hand_over_marked()
        if not self.spool.receiving.is_dir():
            return
        unmarked = [p for p in self.spool.receiving.iterdir()
                    if not p.name.endswith(DONE_MARKER)]
        cut = []
        for path in unmarked:
            if _whole(path):
                log.warning("%s: storescp stopped after writing it whole, maybe after answering "
                            "for it: handed over (a duplicate at worst)", path.name)
                with contextlib.suppress(FileNotFoundError):
                    os.rename(path, self.spool.incoming / path.name)
            else:
                cut.append(path)
        self.spool.quarantine_unfinished(
            cut, "storescp stopped while writing it; the sender got no success and sends it "
            "again")


def _whole(path: Path) -> bool:
    """Whether a file storescp left holds a whole object (its elements all there; an
    empty or unreadable file is taken for one cut short)."""
    try:
        read_dicom(path)
    except (BadInput, OSError):
        return False
    return True


# getscu's option for each Q/R model it can ask with (Get SOP classes).
GETSCU_MODELS = {"1.2.840.10008.5.1.4.1.2.1.3": "--patient",  # Patient Root, GET
                 "1.2.840.10008.5.1.4.1.2.2.3": "--study"}  # Study Root, GET
# A retrieve has at most 65535 sub-operations (US counts); getscu's own timeouts (connect,
# ACSE, DIMSE) end one the PACS stops answering long before this limit.
MOST_SUB_OPERATIONS = 65535


def getscu_argv(getscu: Path, query: Path, model: str, source: Destination, calling_ae: str,
                folder: Path, timeout: float, bit_preserving: bool) -> list[str]:
    """bit_preserving: each object written as it came, straight to disk (twice as fast,
    half the CPU, measured), but named by the PACS's SOP Instance UID unchecked, so that a
    UID such as "../x" writes outside the folder (tried on 3.6.7): only for a getscu
    confined to the folder (Landlock). Without it getscu makes the name safe ("CT..._x")
    and writes the object as DCMTK encodes it."""
    seconds = str(max(1, int(timeout)))
    return [
        str(getscu),
        "--aetitle", calling_ae,
        "--call", source.ae_title,
        GETSCU_MODELS[model],
        # --debug: each C-STORE response (the instance UID and status of an object it
        # stored) and each C-GET response (the counts), read while it runs.
        "--debug",
        *(["--bit-preserving"] if bit_preserving else []),
        "--max-pdu", "131072",
        "--timeout", seconds, "--acse-timeout", seconds, "--dimse-timeout", seconds,
        "--output-directory", str(folder),
        source.host, str(source.port), str(query),
    ]


_MESSAGE_TYPE_RE = re.compile(r"^D: Message Type\s*:\s*(\S+ \S+)")
_AFFECTED_INSTANCE_RE = re.compile(r"^D: Affected SOP Instance UID\s*:\s*(\S+)\s*$")
_SUB_OPERATIONS_RE = re.compile(
    r"^D: (Remaining|Completed|Failed|Warning) Suboperations\s*:\s*(\d+)")


def stored_by_getscu(folder: Path, uid: str) -> Path | None:
    """The file getscu stored an instance in: named by its SOP Instance UID in bit-preserving
    mode, `<modality>.<UID>` in the other. None for a UID that is no plain name (a path):
    that object is not taken, wherever getscu put it."""
    if not uid or "/" in uid or uid.startswith("."):  # dot names are the relay's own
        return None
    if (folder / uid).is_file():
        return folder / uid
    found = [p for p in folder.glob("*." + glob.escape(uid)) if p.parent == folder]
    return found[0] if len(found) == 1 else None


def getscu_updates(output: Iterable[str], folder: Path) -> Iterator[GetUpdate]:
    """What getscu's --debug output says as it runs: each object stored (getscu writes it,
    then prints the C-STORE response it answers with: a success names a whole file), and
    each C-GET response (its counts, then its status)."""
    kind = ""
    uid = ""
    counts: dict[str, int] = {}
    for line in output:
        # ~45 lines per object: only the sections of the two responses are read further.
        if line.startswith("D: Message Type"):
            message = _MESSAGE_TYPE_RE.match(line)
            kind = message.group(1) if message is not None else ""
            kind = kind if kind in ("C-STORE RSP", "C-GET RSP") else ""
            uid, counts = "", {}
        elif not kind:
            continue
        elif kind == "C-STORE RSP":
            if (affected := _AFFECTED_INSTANCE_RE.match(line)) is not None:
                uid = affected.group(1)
            elif (status := _DIMSE_STATUS_RE.match(line)) is not None and uid:
                if int(status.group(1), 16) == 0:
                    path = stored_by_getscu(folder, uid)
                    if path is not None:
                        yield GetUpdate(path=path, uid=uid)
                kind = ""
        elif kind == "C-GET RSP":
            if (count := _SUB_OPERATIONS_RE.match(line)) is not None:
                counts[count.group(1).lower()] = int(count.group(2))
            elif (status := _DIMSE_STATUS_RE.match(line)) is not None:
                yield GetUpdate(status=int(status.group(1), 16),
                                remaining=counts.get("remaining", 0),
                                completed=counts.get("completed", 0),
                                failed=counts.get("failed", 0),
                                warning=counts.get("warning", 0))
                kind = ""


class GetscuRun:
    """getscu running (engine.get_by_tool): its updates as they come; when it ends without a
    final C-GET response, one last update says why."""

    def __init__(self, argv: list[str], folder: Path, timeout: float,
                 confined: bool) -> None:
        self.folder = folder
        self.run = ToolLines(argv, env=dcmtk_env(), timeout=timeout,
                             confine_to=folder if confined else None)

    def __iter__(self) -> Iterator[GetUpdate]:
        final = False
        for update in getscu_updates(self.run, self.folder):
            final = update.status is not None and not 0xFF00 <= update.status <= 0xFF01
            yield update
        if final:
            return
        output = "\n".join(self.run.lines)
        if self.run.timed_out:
            why = "timed out"
        elif not reached_network(output):
            why = f"stopped before connecting (exit {self.run.returncode}): {last_lines(output)}"
        else:
            why = next((ln for ln in output.splitlines() if ln.startswith(("F:", "E:"))),
                       last_lines(output))
        yield GetUpdate(error=f"getscu: {why}")

    def stop(self) -> None:
        """End it from another thread (a cancelled retrieve): the association goes with it."""
        with contextlib.suppress(OSError):
            self.run.proc.kill()


class DcmtkEngine(Engine):
    name = "dcmtk"
    knows_called_ae = False  # storescp accepts any called AE title
    # A dcmsend per object of a steady stream cost ~20 ms of CPU each (measured, 20/s).
    batch_wait = 0.1

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = Path(bin_dir)
        self.dcmsend = find_tool(self.bin_dir, "dcmsend")
        self.echoscu = find_tool(self.bin_dir, "echoscu")
        self.storescu = find_tool(self.bin_dir, "storescu")  # for TLS destinations
        try:  # query/retrieve fetches with it; pynetdicom does without
            self.getscu: Path | None = find_tool(self.bin_dir, "getscu")
        except FileNotFoundError:
            self.getscu = None
        # For objects whose UIDs must not reach storescu's association profile.
        self.embedded = EmbeddedEngine()

    def describe(self) -> str:
        return f"dcmtk ({self.bin_dir})"

    def receiver(self, config: Config, spool: Spool, beside_work: bool = False,
                 services: Services | None = None) -> Receiver:
        del services  # storescp stores only: the services are on their own port
        return DcmtkReceiver(self, config, spool)

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False,
             confirm_each: bool = True) -> Iterator[SendResult]:
        # One tool process per call: nothing to keep open between calls.
        if destination.tls is not None:
            yield from self._send_tls(files, destination, calling_ae, timeout)
            return
        sendable = []
        for path in files:
            why = _sendable(path)
            if why is None:
                sendable.append(path)
            else:
                yield SendResult(path, Outcome.FAILED, None, f"dcmsend cannot send it: {why}")
        files = sendable
        if not files:
            return
        confirmed: set[Path] = set()  # answered with success while dcmsend still ran
        with tempfile.TemporaryDirectory(prefix="dicom-relay-dcmsend-") as tmp:
            report = Path(tmp) / "report.txt"
            argv = dcmsend_argv(self.dcmsend, files, destination, calling_ae, timeout, report,
                                each_response=confirm_each)
            code: int | None = None
            try:
                run = ToolLines(argv, env=dcmtk_env(), timeout=tool_timeout(timeout, len(files)))
            except OSError as exc:  # gone or not executable since start-up
                yield from local_failures(files, f"cannot run {self.dcmsend}: "
                                          f"{exc.strerror or exc}")
                return
            # Each success leaves the spool as it arrives (the report comes only at the end):
            # a relay killed mid-batch then sends again only what was not confirmed.
            if confirm_each:
                for path in successes_as_sent(run, files):
                    confirmed.add(path)
                    yield SendResult(path, Outcome.DELIVERED, 0, "0x0000: Success")
            else:
                for _ in run:  # --verbose: read to the end, kept in run.lines
                    pass
            output = "\n".join(run.lines).strip()
            if run.timed_out:
                output = "dcmsend timed out"
            else:
                code = run.returncode
            text = report.read_text(errors="replace") if report.exists() else None
        files = [path for path in files if path not in confirmed]
        if not files:
            return
        if text is None and code is not None and not reached_network(output):
            # It stopped before any network activity: a broken installation, a bad option, a
            # TLS or report file it could not use. Not the destination's fault.
            yield from local_failures(files, f"dcmsend stopped before connecting (exit "
                                      f"{code}): {last_lines(output)}")
            return
        if text is None and code is not None and code < 0:
            # Killed by a signal (it crashed, or was killed) after connecting: no report. It
            # sends in order and names each file first: the one it named last without an
            # answer was on the wire, maybe what crashed it (set aside, as for an abort).
            wire = on_the_wire(run.lines, files)
            for path in files:
                yield SendResult(path, Outcome.RETRY, None,
                                 f"dcmsend killed by signal {-code}: {last_lines(output)}",
                                 in_flight=path == wire)
            return
        if text is None:
            # No report: no association (refused, rejected, timed out).
            why = next((ln for ln in output.splitlines() if ln.startswith("F:")), output[-300:])
            yield from retry_all(files, f"dcmsend: {why}")
            return
        by_name = parse_dcmsend_report(text, output)
        results = []
        for path in files:
            found = by_name.get(str(path))
            if found is None:
                # dcmsend refused the file before sending (unreadable as DICOM).
                results.append(SendResult(path, Outcome.FAILED, None,
                                          "dcmsend could not read it"))
                continue
            results.append(SendResult(path, found.outcome, found.status, found.detail,
                                      refused_syntax=found.refused_syntax))
        # dcmsend sends in order: when the association broke, the first file it did not get
        # a response for was the one on the wire.
        yield from mark_in_flight(results, "Peer aborted" in output
                                  or "Failed receiving DIMSE response" in output)

    def _send_tls(self, files: list[Path], destination: Destination, calling_ae: str,
                  timeout: float) -> Iterator[SendResult]:
        """storescu over TLS, as many associations as 128 presentation contexts need."""
        ready: list[tuple[Path, Context]] = []
        odd: list[Path] = []
        for path in files:
            found = _presentation(path)
            if isinstance(found, str):
                yield SendResult(path, Outcome.FAILED, None, f"storescu cannot send it: {found}")
            elif all(is_uid(uid) for uid in found):
                ready.append((path, found))
            else:
                # Peer text that is not a UID never reaches the profile file (where it could
                # add lines): pynetdicom sends such an object as it is.
                odd.append(path)
        if odd:
            yield from self.embedded.send(odd, destination, calling_ae, timeout)
        for group, contexts in context_groups(ready, lambda item: item[1]):
            yield from self._storescu([path for path, _ in group], contexts, destination,
                                      calling_ae, timeout)

    def _storescu(self, files: list[Path], contexts: list[Context],
                  destination: Destination, calling_ae: str,
                  timeout: float) -> Iterator[SendResult]:
        with tempfile.TemporaryDirectory(prefix="dicom-relay-storescu-") as tmp:
            profile = Path(tmp) / "association.cfg"
            profile.write_text(association_profile(contexts))
            argv = storescu_argv(self.storescu, files, destination, calling_ae, timeout,
                                 profile)
            try:
                proc = run_tool(argv, env=dcmtk_env(), timeout=tool_timeout(timeout, len(files)))
                output = proc.stdout + proc.stderr
            except subprocess.TimeoutExpired as exc:
                output = str(exc.stdout or "") + "\nstorescu timed out"
            except OSError as exc:
                yield from local_failures(files, f"cannot run {self.storescu}: "
                                          f"{exc.strerror or exc}")
                return
        if "timed out" not in output and not reached_network(output):
            yield from local_failures(files, f"storescu stopped before connecting (exit "
                                      f"{proc.returncode}): {last_lines(output)}")
            return
        accepted, sent = parse_storescu_log(output)
        if "No Acceptable Presentation Contexts" in output:
            # The destination answered and refused every SOP class / transfer syntax of these
            # objects: sending them again will not change that.
            why = ", ".join(sorted(set(refused_contexts(output).values()))) or "refused"
            for path in files:
                yield SendResult(path, Outcome.FAILED, None, "storescu: destination refused "
                                 f"the presentation context ({why})", refused_syntax=True)
            return
        if not accepted:
            # No association (refused, rejected, TLS handshake failed, timed out).
            why = next((ln for ln in output.splitlines() if ln.startswith("F:")),
                       output.strip()[-300:])
            yield from retry_all(files, f"storescu: {why}")
            return
        # storescu sends in the order given; a file it skipped while checking its input
        # ("cannot access file", no SOP class) has no "Sending file:" line.
        by_name: dict[str, list[Answer]] = {}
        for name, answer in sent:
            by_name.setdefault(name, []).append(answer)
        results = []
        for path in files:
            answers = by_name.get(str(path))
            if not answers:
                results.append(SendResult(path, Outcome.FAILED, None,
                                          "storescu could not read it"))
                continue
            answer = answers.pop(0)
            results.append(SendResult(path, answer.outcome, answer.status,
                                      f"storescu: {answer.detail}",
                                      refused_syntax=answer.refused_syntax))
        yield from mark_in_flight(results, any(marker in output for marker in _ABORT_MARKERS))

    def get_by_tool(self, source: Destination, query: Path, model: str, calling_ae: str,
                    folder: Path, timeout: float, storage: list[tuple[str, list[str]]]
                    ) -> GetscuRun | None:
        del storage  # getscu proposes its own list of storage classes, uncompressed
        # getscu has no TLS, and asks with the two common models only.
        if self.getscu is None or source.tls is not None or model not in GETSCU_MODELS:
            return None
        # Bit-preserving only where getscu can be kept from writing outside the folder.
        confined = landlock.available()
        argv = getscu_argv(self.getscu, query, model, source, calling_ae, folder, timeout,
                           bit_preserving=confined)
        return GetscuRun(argv, folder, tool_timeout(timeout, MOST_SUB_OPERATIONS), confined)

    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None:
        seconds = str(max(1, int(timeout)))
        argv = [str(self.echoscu), "--verbose", "--aetitle", calling_ae,
                "--call", destination.ae_title,
                "--timeout", seconds, "--acse-timeout", seconds, "--dimse-timeout", seconds,
                *tls_args(destination.tls), destination.host, str(destination.port)]
        limit = tool_timeout(timeout, 1)
        try:
            proc = run_tool(argv, env=dcmtk_env(), timeout=limit)
        except OSError as exc:
            raise ToolFailure(f"local tool failure: cannot run {self.echoscu}: "
                              f"{exc.strerror or exc}") from None
        except subprocess.TimeoutExpired:
            raise DestinationUnavailable(f"{destination.name}: echoscu timed out after "
                                         f"{limit:.0f} s") from None
        output = proc.stdout + proc.stderr
        if not reached_network(output):
            raise ToolFailure(f"local tool failure: echoscu stopped before connecting (exit "
                              f"{proc.returncode}): {last_lines(output)}")
        if proc.returncode != 0:
            why = (proc.stderr or proc.stdout).strip().splitlines()
            raise DestinationUnavailable(f"{destination.name}: echoscu: "
                                         f"{why[-1] if why else f'exit {proc.returncode}'}")

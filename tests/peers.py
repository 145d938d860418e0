"""Real DICOM peers for the tests, on 127.0.0.1 with ports chosen free at run time:
Orthanc (Debian `orthanc`) as the destination PACS, DCMTK's dcmsend as the modality, and
`dicom-relay` itself as a subprocess, exactly as a user starts it."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
ORTHANC_DICOMWEB = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian orthanc-dicomweb
DCMTK_BIN = Path("/usr/bin")  # never by bare name: pynetdicom's scripts shadow DCMTK's
REPO = Path(__file__).resolve().parent.parent


def find_dcm4che() -> Path | None:
    """The dcm4che toolkit the tests run: DCM4CHE_HOME, else /opt/dcm4che-toolkit (our Docker
    image), else the real 5.24.0 toolkit in ../shared beside the checkout (CI)."""
    for candidate in (os.environ.get("DCM4CHE_HOME"), "/opt/dcm4che-toolkit",
                      REPO.parent / "shared" / "dcm4che-5.24.0"):
        if candidate and (Path(candidate) / "bin" / "storescu").is_file():
            return Path(candidate)
    return None


DCM4CHE_HOME = find_dcm4che()
# CI sets REQUIRE_ALL=1 (.ci/run): what a test would skip or stand in for when something is
# missing here (a toolkit, podman, HAProxy, root) is a failure there (conftest.py).
REQUIRE_ALL = os.environ.get("REQUIRE_ALL") == "1"
NO_DCM4CHE = ("no dcm4che toolkit here: not at $DCM4CHE_HOME, /opt/dcm4che-toolkit or "
              "../shared/dcm4che-5.24.0 (set DCM4CHE_HOME to run the dcm4che tests)")


def with_dcm4che(*params: str) -> list[Any]:
    """pytest params for the dcm4che engine: run wherever a toolkit is found, else skipped
    saying why."""
    import pytest

    return [pytest.param(p, marks=pytest.mark.skipif(DCM4CHE_HOME is None, reason=NO_DCM4CHE))
            for p in params]


ENGINES = ["embedded", "dcmtk", *with_dcm4che("dcm4che")]


def logged_events() -> Any:
    """An event stream whose outcomes are logged, as in a running relay (relay.ops.logs),
    for a stage driven on its own by a test that reads its log lines."""
    from relay.events import EventBus
    from relay.ops.logs import LogLines

    events = EventBus()
    events.subscribe(LogLines())
    return events


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on. Never one handed out before in this process: the kernel may
    give the same free port to two bind(0) calls in a row, and two peers told to listen on
    one port (Orthanc's DICOM and HTTP ports) make a test fail far from the cause."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None,
                  ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def wait_until(predicate: Any, timeout: float, interval: float = 0.1, what: str = "") -> Any:
    """Poll until predicate() is truthy; bounded in time. Returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    if not value:
        raise TimeoutError(f"timed out after {timeout} s waiting for {what or predicate}")
    return value


def dcmtk_env() -> dict[str, str]:
    # Debian's DCMTK leaves Nagle on unless told: ~88 ms per C-STORE on loopback without it.
    return {**os.environ, "TCP_NODELAY": "1"}


class Orthanc:
    """An Orthanc started with a temporary config: DICOM and REST on loopback only."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", dicomweb: bool = False,
                 accepted_syntaxes: list[str] | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        """dicomweb: with the DICOMweb plugin (Debian's orthanc-dicomweb) at
        self.dicomweb_url. accepted_syntaxes: the transfer syntaxes it takes (Orthanc's
        AcceptedTransferSyntaxes; None: all it knows). extra: more of its configuration."""
        self.workdir = workdir
        self.aet = aet
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "orthanc.json"
        self.config_path.write_text(json.dumps({
            "Name": "test-pacs",
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "DicomAet": aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "HttpServerEnabled": True,
            "Plugins": [ORTHANC_DICOMWEB] if dicomweb else [],
            "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
            "StorageCompression": False,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            **({"AcceptedTransferSyntaxes": accepted_syntaxes} if accepted_syntaxes else {}),
            **(extra or {}),
        }))
        self.log = open(workdir / "orthanc.log", "ab")  # noqa: SIM115 - closed in stop()
        self.dicomweb_url = f"http://127.0.0.1:{self.http_port}/dicom-web"

    def start(self) -> Orthanc:
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=dcmtk_env())
        wait_for_port(self.http_port, proc=self.proc)
        wait_for_port(self.dicom_port, proc=self.proc)
        self._wait_for_echo()
        return self

    def _wait_for_echo(self, timeout: float = 20.0) -> None:
        """Until Orthanc answers a C-ECHO: a listening socket is not yet an association a
        sender can open, and whoever fails first should say why."""
        argv = [str(DCMTK_BIN / "echoscu"), "-aec", self.aet, "127.0.0.1",
                str(self.dicom_port)]
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(argv, env=dcmtk_env(), capture_output=True, text=True,
                                    timeout=30, check=False)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline or (self.proc and self.proc.poll() is not None):
                self.log.flush()
                tail = (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"Orthanc on port {self.dicom_port} does not answer C-ECHO: "
                                   f"{result.stderr.strip()}\n--- orthanc.log ---\n{tail}")
            time.sleep(0.1)

    def accept(self, syntaxes: list[str] | None) -> None:
        """Change the transfer syntaxes it takes (None: all), from its next start."""
        config = json.loads(self.config_path.read_text())
        config.pop("AcceptedTransferSyntaxes", None)
        if syntaxes:
            config["AcceptedTransferSyntaxes"] = syntaxes
        self.config_path.write_text(json.dumps(config))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        """End it for good. Killed, not stopped: its data goes with the test, and a clean
        stop takes Orthanc 3.5 s (its WebDAV, DICOM and jobs threads end one after another),
        paid by every test with a PACS."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self.log.close()

    def rest(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=30) as response:
            return json.loads(response.read())

    def add_modality(self, name: str, aet: str, port: int) -> None:
        """Tell it of a DICOM peer on this machine (a C-MOVE destination), over REST."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}/modalities/{name}", method="PUT",
            data=json.dumps({"AET": aet, "Host": "127.0.0.1", "Port": port}).encode())
        with urllib.request.urlopen(request, timeout=30):
            pass

    def delete_all(self) -> None:
        """Forget every instance (a PACS that lost a study)."""
        for iid in self.instance_ids():
            request = urllib.request.Request(
                f"http://127.0.0.1:{self.http_port}/instances/{iid}", method="DELETE")
            with urllib.request.urlopen(request, timeout=30):
                pass

    def instance_ids(self) -> list[str]:
        return list(self.rest("/instances"))

    def count(self) -> int:
        return len(self.instance_ids())

    def tags_by_sop_uid(self) -> dict[str, dict[str, Any]]:
        """SOP Instance UID → simplified tags, for every stored instance."""
        out = {}
        for iid in self.instance_ids():
            tags = self.rest(f"/instances/{iid}/simplified-tags")
            out[tags["SOPInstanceUID"]] = tags
        return out

    def file(self, instance_id: str) -> bytes:
        """The stored file, byte for byte, as Orthanc keeps it."""
        url = f"http://127.0.0.1:{self.http_port}/instances/{instance_id}/file"
        with urllib.request.urlopen(url, timeout=60) as response:
            data: bytes = response.read()
        return data

    def stored(self) -> dict[str, Any]:
        """SOP Instance UID → the stored dataset (pydicom), for every stored instance."""
        out = {}
        for iid in self.instance_ids():
            ds = dcmread_bytes(self.file(iid), pixels=True)
            out[str(ds.SOPInstanceUID)] = ds
        return out

    def transfer_syntax(self, sop_uid: str) -> str:
        for iid in self.instance_ids():
            tags = self.rest(f"/instances/{iid}/simplified-tags")
            if tags["SOPInstanceUID"] == sop_uid:
                url = (f"http://127.0.0.1:{self.http_port}/instances/{iid}/metadata/"
                       "TransferSyntax")
                with urllib.request.urlopen(url, timeout=30) as response:  # plain text
                    return response.read().decode().strip()
        raise KeyError(sop_uid)


def dcmsend(files: Iterable[Path], port: int, called_aet: str, calling_aet: str = "MODALITY",
            timeout: float = 300, report: Path | None = None
            ) -> subprocess.CompletedProcess[str]:
    """DCMTK dcmsend as the modality: each file in its own transfer syntax, one association.
    Its exit code is 0 even when files got no success: `report` (read with
    dcmsend_statuses) says, per file, what was acknowledged."""
    argv = [str(DCMTK_BIN / "dcmsend"), "-aet", calling_aet, "-aec", called_aet, "--no-halt",
            *(["--create-report-file", str(report)] if report else []),
            "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, env=dcmtk_env(),
                          timeout=timeout, check=False)


def dcmsend_statuses(report: Path) -> dict[str, str]:
    """File name → DIMSE status text ("0x0000 (Success)", "<not sent>", …) from dcmsend's
    --create-report-file."""
    statuses = {}
    for block in report.read_text(errors="replace").split("\n\n"):
        fields = dict(line.split(" : ", 1) for line in block.splitlines() if " : " in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "Filename" in fields and "DIMSE Status" in fields:
            statuses[Path(fields["Filename"]).name] = fields["DIMSE Status"]
    return statuses


def relay_config(path: Path, *, port: int, spool: Path,
                 destinations: Iterable[tuple[str, str, int] | tuple[str, str, int, str]],
                 engine: str = "embedded", converter: str = "embedded", rules: str = "",
                 receiver: str = "", extra: str = "", min_free_mb: float = 64,
                 spool_extra: str = "") -> Path:
    """A relay config for tests and benchmarks: receiver on 127.0.0.1:port, fast retries.
    destinations: (name, AE title, port[, more TOML for that destination])."""
    dests = "".join(f"""
[[destinations]]
name = "{d[0]}"
ae_title = "{d[1]}"
host = "127.0.0.1"
port = {d[2]}
{d[3] if len(d) > 3 else ""}
""" for d in destinations)
    path.write_text(f"""
[receiver]
host = "127.0.0.1"
port = {port}
{receiver}

[spool]
path = "{spool}"
# The default floor (1 GiB, or twice the largest object) would make a test depend on the
# free space of the machine it runs on; the disk-full test sets its own.
min_free_mb = {min_free_mb}
{spool_extra}

[toolkit]
engine = "{engine}"
converter = "{converter}"
{f'dcm4che_home = "{DCM4CHE_HOME}"' if engine == "dcm4che" and DCM4CHE_HOME else ""}

[sender]
retry_initial = 0.2
retry_max = 1.0
timeout = 10

{extra}
{dests}
{rules}
""")
    return path


EG_RULE = '[[rules]]\nset = "PatientID"\ncopy_from = "EthnicGroup"\n'


def descendants(pid: int) -> list[int]:
    """The live processes below `pid` (children, theirs, ...), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def halted_within(pid: int, seconds: float) -> bool:
    """Wait until every thread of pid is stopped (SIGSTOP) or dead (SIGKILL): a signal takes
    a moment to reach each thread of a process, and until then it may still read a socket."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        states = []
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except FileNotFoundError:
            return True  # gone, and reaped
        for thread in threads:
            try:
                stat = Path(f"/proc/{pid}/task/{thread}/stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue  # that thread ended meanwhile
            states.append(stat.rsplit(")", 1)[1].split()[0])
        if all(state in "TtZX" for state in states):
            return True
        time.sleep(0.001)
    return False


def send_until_settled(sender: Any, rounds: int = 10) -> None:
    """A DestinationSender's queue sent batch after batch (its retries too) until nothing is
    pending, for at most `rounds` batches."""
    sender.load_backlog()
    for _ in range(rounds):
        if not sender.pending():
            break
        batch = sender._next_batch(idle_limit=1.0)
        if batch:
            sender.send_batch(batch)


@dataclass
class PoisonRun:
    """What became of four CT objects queued for a PACS that breaks the sender each time the
    second of them (the victim) is on the wire."""

    sender: Any  # the DestinationSender, after sending until nothing was pending or 10 rounds
    pacs: Any
    received: list[str]  # the distinct SOP Instance UIDs the PACS stored, sorted
    others: list[str]  # the UIDs of the three that are not the victim, sorted
    quarantined: list[str]  # the object files in failed/
    sidecar: str  # the failed/ sidecar's text, "" when there is none


def send_past_a_poison_object(tmp_path: Path, engine: Any, make_pacs: Any,
                              timeout: float) -> PoisonRun:
    """Queue four CT objects, start make_pacs(victim UID) (a ScriptedSCP that breaks the
    sender when the victim arrives) and send until settled."""
    from pydicom import dcmread

    from dicomdata import ct_series
    from relay.config.model import Destination, SenderConfig
    from relay.send.sender import DestinationSender
    from relay.spool import Spool

    ct_series(tmp_path / "ct", 4)
    files = sorted((tmp_path / "ct").iterdir())
    uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    pacs = make_pacs(uids[1])
    spool = Spool(tmp_path / "spool", ["pacs"]).create()
    try:
        for i, f in enumerate(files):
            shutil.copy(f, spool.outbox("pacs") / f"{i}-ct.dcm")
        dest = Destination("pacs", "SCRIPTED", "127.0.0.1", pacs.port)
        sender = DestinationSender(spool, dest, engine, SenderConfig(
            batch_size=10, retry_initial=0.05, retry_max=0.1, timeout=timeout))
        send_until_settled(sender)
    finally:
        pacs.close()
    failed = spool_files(spool.root, "failed")
    sidecars = [p.read_text() for p in failed if p.suffix == ".json"]
    return PoisonRun(sender, pacs, sorted(set(pacs.received)), sorted(uids[:1] + uids[2:]),
                     [p.name for p in failed if p.suffix != ".json"],
                     sidecars[0] if len(sidecars) == 1 else "")


def proc_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MB, CPU seconds) of a live process and all its live descendants (the
    relay's receiver process or storescp, a dcmsend under way), each with the children it
    has waited for. The RSS is the sum of their peaks: an upper bound."""
    ticks = os.sysconf("SC_CLK_TCK")
    tree = {pid, *descendants(pid)}
    rss_kb = cpu = 0.0
    for member in tree:
        try:
            status = Path(f"/proc/{member}/status").read_text()
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        rss_kb += next((int(line.split()[1]) for line in status.splitlines()
                        if line.startswith("VmHWM")), 0)
        cpu += sum(int(x) for x in fields[11:15]) / ticks
    return rss_kb / 1024, cpu


class RelayProcess:
    """`dicom-relay VERB --config FILE` as a subprocess, as systemd would run it."""

    def __init__(self, config_path: Path, workdir: Path, verb: str = "run",
                 cwd: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.verb = verb
        self.cwd = cwd  # its working directory (systemd's is /)
        self.env = env  # None: the test's own environment
        self.log_path = workdir / f"relay-{verb}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, port: int | None = None) -> RelayProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relay", self.verb, "--config", str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env)
        log.close()
        if port is not None:
            wait_for_port(port, proc=self.proc)
        return self

    def stop(self, timeout: float = 30) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.proc = None
                tail = "\n".join(self.output().splitlines()[-40:])
                raise AssertionError(f"the relay did not stop within {timeout:g} s of "
                                     f"SIGTERM (killed); its log ends:\n{tail}") from None
        code = self.proc.returncode
        self.proc = None
        return code

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def spool_files(spool: Path, folder: str) -> list[Path]:
    root = spool / folder
    if not root.exists():
        return []
    return sorted(p for p in root.rglob("*") if p.is_file())


SPOOL_FOLDERS = ("receiving", "incoming", "work", "out", "failed")


def spool_objects(spool: Path) -> list[Path]:
    """Every object file anywhere in the spool (being received, waiting, in hand, queued,
    quarantined; sidecars left out): what "nothing stored" must find empty."""
    return [p for folder in SPOOL_FOLDERS for p in spool_files(spool, folder)
            if p.suffix != ".json"]


class ScriptedSCP:
    """A pynetdicom Storage SCP that answers the status scripted per InstanceNumber (default
    success), counts what it stored per SOP Instance UID, and can drop the connection in the
    middle of an association (after `reset_after` objects) like a crashing PACS."""

    def __init__(self, statuses: dict[int, int] | None = None, ae_title: str = "SCRIPTED",
                 reset_after: int | None = None, port: int | None = None,
                 keep_files: Path | None = None, ssl_context: Any = None) -> None:
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        from relay.toolkits.associations import prefer_requestor_syntax, set_nodelay

        self.statuses = statuses or {}
        self.reset_after = reset_after
        self.keep_files = keep_files  # write what arrives, byte for byte
        self.kept: list[tuple[str, Path]] = []  # (Affected SOP Instance UID, file)
        self.received: list[str] = []
        self.arrived_at: dict[str, float] = {}  # UID → when it first arrived (wall clock)
        self.patient_ids: dict[str, object] = {}  # the last PatientID per UID
        self.every_patient_id: list[tuple[str, object]] = []  # (UID, PatientID), duplicates too
        self.syntaxes: dict[str, str] = {}  # SOP Instance UID → transfer syntax it came in
        self.associations: dict[str, int] = {}  # SOP Instance UID → the association it came on
        self.resets = 0
        self.port = port or free_port()
        self._per_assoc: dict[int, int] = {}
        ae = AE(ae_title)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 50
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      ssl_context=ssl_context, evt_handlers=[
            (evt.EVT_C_STORE, self.on_store), (evt.EVT_CONN_OPEN, set_nodelay),
            (evt.EVT_REQUESTED, prefer_requestor_syntax)])

    def on_store(self, event: Any) -> int:
        key = id(event.assoc)
        self._per_assoc[key] = self._per_assoc.get(key, 0) + 1
        if self.reset_after is not None and self._per_assoc[key] > self.reset_after:
            # Drop the TCP connection without a response, as a crashing PACS would.
            self.resets += 1
            sock = event.assoc.dul.socket.socket
            linger_zero = struct.pack("ii", 1, 0)  # close with RST, not FIN
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger_zero)
            sock.close()
            return 0xA700
        if self.keep_files is not None:
            uid = str(event.request.AffectedSOPInstanceUID)
            kept = self.keep_files / f"{len(self.kept):05d}.dcm"
            kept.write_bytes(event.encoded_dataset())
            self.kept.append((uid, kept))
        ds = event.dataset
        number = ds.get("InstanceNumber", 0)
        status = self.statuses.get(int(number) if isinstance(number, int) else 0, 0x0000)
        if status in (0x0000, 0xB000, 0xB006, 0xB007):
            uid = str(event.request.AffectedSOPInstanceUID)
            self.received.append(uid)
            self.arrived_at.setdefault(uid, time.time())
            self.patient_ids[uid] = ds.get("PatientID")
            self.every_patient_id.append((uid, ds.get("PatientID")))
            self.syntaxes[uid] = str(event.context.transfer_syntax)
            self.associations[uid] = key
        return status

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for uid in self.received:
            out[uid] = out.get(uid, 0) + 1
        return out

    def close(self) -> None:
        """Go down as a PACS does: stop listening and drop the associations still open (a
        sender may keep one between batches)."""
        if self.server is not None:
            # Stop listening first: a sender that reconnects at once (dcm4che's JVM does, in
            # milliseconds) would otherwise get in between the aborts and the shutdown.
            server, self.server = self.server, None
            server.shutdown()
            for assoc in list(server.active_associations):
                assoc.abort()


@dataclass
class Link:
    """How a sender reaches its test peer: one engine, plain or over DICOM TLS (then
    `server_ssl` is the peer's side and `tls` the destination's table, from a PKI the test
    generated)."""

    engine: Any  # relay.toolkits.base.Engine
    server_ssl: Any = None  # ssl.SSLContext for ScriptedSCP / AE.start_server
    tls: Any = None  # relay.config.TLSConfig

    def destination(self, ae_title: str, port: int) -> Any:
        from relay.config.model import Destination

        return Destination("scp", ae_title, "127.0.0.1", port, tls=self.tls)

    def scp(self, statuses: dict[int, int] | None = None, **kwargs: Any) -> ScriptedSCP:
        return ScriptedSCP(statuses, ssl_context=self.server_ssl, **kwargs)


class DcmtkStoreSCP:
    """DCMTK's storescp: a C-MOVE destination (a viewer's workstation), a destination
    PACS without storage commitment."""

    def __init__(self, folder: Path, aet: str = "VIEWER") -> None:
        self.folder = folder
        self.aet = aet
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder.parent / f"{folder.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(DCMTK_BIN / "storescp"), "-aet", aet, "+xa", "-od", str(folder),
             str(self.port)], stdout=self.log, stderr=subprocess.STDOUT, env=dcmtk_env())
        wait_for_port(self.port, proc=self.proc)

    def stored(self) -> list[Path]:
        return sorted(self.folder.iterdir())

    def sop_uids(self) -> set[str]:
        from pydicom import dcmread

        return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in self.stored()}

    def clear(self) -> None:
        for path in self.folder.iterdir():
            path.unlink()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


def dcm4che_env() -> dict[str, str]:
    from relay.toolkits.dcm4che import tool_env

    assert DCM4CHE_HOME is not None
    return tool_env(DCM4CHE_HOME)


def dcm4che_storescu(files: Iterable[Path], port: int, called_aet: str,
                     calling_aet: str = "DCM4CHESCU", timeout: float = 300
                     ) -> subprocess.CompletedProcess[str]:
    """dcm4che's storescu as the modality (its exit code proves nothing: read the output)."""
    assert DCM4CHE_HOME is not None
    argv = [str(DCM4CHE_HOME / "bin" / "storescu"), "-b", calling_aet,
            "-c", f"{called_aet}@127.0.0.1:{port}", *map(str, files)]
    return subprocess.run(argv, capture_output=True, text=True, env=dcm4che_env(),
                          timeout=timeout, check=False)


class Dcm4cheStoreSCP:
    """dcm4che's storescp as a destination PACS, storing into a folder."""

    def __init__(self, folder: Path, aet: str = "DCM4CHESCP") -> None:
        assert DCM4CHE_HOME is not None
        self.folder = folder
        self.aet = aet
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.log = open(folder.parent / f"{folder.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(DCM4CHE_HOME / "bin" / "storescp"), "-b", f"{aet}@127.0.0.1:{self.port}",
             "--directory", str(folder)], stdout=self.log, stderr=subprocess.STDOUT,
            env=dcm4che_env())
        wait_for_port(self.port, 60, self.proc)

    def stored(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir() if p.suffix != ".part")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class ScriptedStow:
    """A scripted STOW-RS server (http.server, 127.0.0.1) for the statuses Orthanc cannot be
    made to give. `script(call_number, sop_instance_uids) -> (HTTP status, JSON body or None,
    headers)`; every request body is parsed as multipart/related, the instances it carried
    are kept in `received` (SOP Instance UIDs, per request)."""

    def __init__(self, script: Any) -> None:
        import email
        import email.policy
        import http.server
        import threading

        self.script = script
        self.received: list[list[str]] = []
        self.auth: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:  # noqa: N802 - QIDO-RS for echo
                owner.auth.append(self.headers.get("Authorization"))
                status, body, headers = owner.script(-1, [])
                self._answer(status, body if body is not None else [], headers)

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", "0"))
                data = self.rfile.read(length)
                owner.auth.append(self.headers.get("Authorization"))
                message = email.message_from_bytes(
                    f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + data,
                    policy=email.policy.HTTP)
                uids = []
                for part in message.iter_parts():
                    ds = dcmread_bytes(part.get_payload(decode=True))
                    uids.append(str(ds.file_meta.MediaStorageSOPInstanceUID))
                owner.received.append(uids)
                status, body, headers = owner.script(len(owner.received) - 1, uids)
                self._answer(status, body, headers)

            def _answer(self, status: int, body: Any, headers: dict[str, str]) -> None:
                payload = b"" if body is None else (
                    body if isinstance(body, bytes) else json.dumps(body).encode())
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(payload)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def dcmread_bytes(data: bytes, pixels: bool = False) -> Any:
    import io
    import warnings

    from pydicom import dcmread

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(io.BytesIO(data), stop_before_pixels=not pixels)


def stow_response(stored: Iterable[str] = (), failed: dict[str, int] | None = None,
                  warnings: dict[str, int] | None = None) -> dict[str, Any]:
    """A STOW-RS response body (DICOM JSON): ReferencedSOPSequence for `stored` (with
    WarningReason from `warnings`), FailedSOPSequence with FailureReason for `failed`."""
    def ref(uid: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {"00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [uid]}, **extra}

    body: dict[str, Any] = {}
    warnings = warnings or {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            ref(uid, {"00081196": {"vr": "US", "Value": [warnings[uid]]}}
                if uid in warnings else {}) for uid in stored]}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            ref(uid, {"00081197": {"vr": "US", "Value": [code]}})
            for uid, code in failed.items()]}
    return body


PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian 12's postgresql


class PostgreSQL:
    """A PostgreSQL cluster of its own in a temporary folder, on 127.0.0.1 (Debian's
    postgresql; initdb refuses root, so as root it runs as the postgres user). stop() and
    start() again keep the data: a database that goes down in the middle of a study."""

    def __init__(self) -> None:
        import tempfile

        self.port = free_port()
        # Not under pytest's tmp_path: root's folders there are closed to the postgres user.
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-relay-pg-"))
        self.data = self.folder / "data"
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.folder, "postgres", "postgres")
        # A language's collation where the machine has one, as a hospital's server would:
        # the C locale would hide what a collation does to the name search.
        have = subprocess.run(["locale", "-a"], capture_output=True, text=True).stdout.split()
        locale = "en_US.UTF-8" if "en_US.utf8" in have else "C.UTF-8"
        subprocess.run([*self.as_user, str(PG_BIN / "initdb"), "-D", str(self.data), "-U",
                        "relay", "--auth=trust", "-E", "UTF8", "--locale", locale,
                        "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        self.url = f"postgresql://relay@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgreSQL:
        subprocess.run([*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w",
                        "-l", str(self.folder / "server.log"), "-o",
                        f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off", "start"], check=True, capture_output=True, timeout=60)
        return self

    def stop(self, mode: str = "fast") -> None:
        subprocess.run([*self.as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-w",
                        "-m", mode, "stop"], check=False, capture_output=True, timeout=60)

    def close(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


def scripted_find_pacs(matches: list[Any], pace: float
                       ) -> tuple[Any, int, threading.Event]:
    """A PACS (pynetdicom, scriptable) answering any C-FIND with these matches, one per
    `pace` seconds, as a PACS searching a large archive does: (its server, to shut down; its
    port; an event set when a C-CANCEL reached it). Orthanc answers a few hundred matches
    faster than a requester's C-CANCEL can come back through the relay."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    cancelled = threading.Event()

    def on_find(event: Any) -> Any:
        for ds in matches:
            if event.is_cancelled:
                cancelled.set()
                yield 0xFE00, None
                return
            yield 0xFF00, ds
            time.sleep(pace)

    ae = AE("SCRIPTED")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_FIND, on_find)])
    return server, port, cancelled


def scripted_get_pacs(objects: list[Any]) -> tuple[Any, int]:
    """A PACS (pynetdicom, scriptable) answering any C-GET with these data sets in order,
    whatever their UIDs say: (its server, to shut down; its port)."""
    from pynetdicom import AE, StoragePresentationContexts, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

    def on_get(event: Any) -> Any:
        yield len(objects)
        for ds in objects:
            yield 0xFF00, ds

    ae = AE("SCRIPTED")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_GET, on_get)])
    return server, port

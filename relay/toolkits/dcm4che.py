"""The dcm4che engine (the toolkit at /opt/dcm4che-toolkit, bundled in our Docker image).

- storescp (`-b AET@host:port --directory incoming/`) writes `<uid>.part` in the directory
  root and renames it when complete: the watcher never takes a `.part` file.
- Sending, C-ECHO and the `toolkit` converter run in one long-lived JVM, a helper process
  (relay.toolkits.dcm4che_bridge, relay.toolkits.dcm4che_jvm) that drives dcm4che's own
  classes: its Association API sends each batch over an association kept between batches,
  and each C-STORE-RSP is a result as it arrives (storescu's results could only be read when
  it exited, one JVM per batch: a kill -9 resent the whole batch). dcm2xml's SAX writer and
  xml2dcm's merge convert in the same JVM. A JVM that dies or hangs is killed and started
  again; the object that was on the wire is the one in flight (set aside after three breaks).
  Query/retrieve's C-GET from the PACS runs there too (get_by_tool: GetSCU's way, each
  object written into the retrieve's folder by Java, a C-CANCEL when the requester cancels).

- DICOM TLS: dcm4che takes Java key stores, not PEM files. The engine makes PKCS12 stores
  from the [tls] tables' PEM files at start-up (relay.tls.java_stores) in a private temporary
  folder, and names TLS 1.3/1.2 and forward-secret AEAD suites explicitly (`--tls` alone
  would enable NULL/3DES/RSA suites). The destination's certificate is always verified
  against the trust store (there is no switch to turn that off); no host name is checked.

- storescp is started with JAVA_LIBRARY_PATH set (tool_env), and the JVM helper gets it as
  java.library.path: without it each `bin/` launcher starts a first JVM only to name the
  platform, then, when the OpenCV codec library is missing (as in a toolkit without
  lib/<platform>/libopencv_java.so), tries to download it into the toolkit's folder and exits
  1. With it: one JVM, nothing written there.
- storescp logs every PDU at DEBUG: its lines keep their own level in our log (receiver_level).

Tests run the real toolkit wherever one is found (DCM4CHE_HOME, /opt/dcm4che-toolkit, or the
copy beside the checkout in CI); storescp's output handling is also tested against quoted
recordings (tests/data/dcm4che/) so that it is checked on a machine without dcm4che.
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lxml import etree

from relay.edit.dicomxml import safe_parser, to_string
from relay.receive.supervisor import SupervisedReceiver, run_tool
from relay.send.results import (
    DestinationUnavailable,
    Outcome,
    Outgoing,
    SendResult,
    ToolFailure,
    classify_status,
    local_failures,
    read_outgoing,
    retry_all,
)
from relay.toolkits.base import Engine, Receiver
from relay.toolkits.common import GetUpdate, context_groups, tool_timeout
from relay.toolkits.dcm4che_bridge import BridgeUnavailable, JvmBridge
from relay.toolkits.tls import JAVA_TLS_CIPHERS, JAVA_TLS_PROTOCOLS, JavaStores, java_stores

if TYPE_CHECKING:
    from relay.config.model import Config, Destination, TLSConfig
    from relay.services.scp import Services
    from relay.spool import Spool

log = logging.getLogger("relay.dcm4che")
_GETS = itertools.count(1)  # C-GETs asked of the JVM: each one's key

# Names of weasis' NativeLibrary (the launchers' `lib/<os>-<arch>`) for platform.machine().
_JAVA_ARCH = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64",
              "armv7l": "armv7a", "i686": "x86", "i386": "x86"}


def java_library_path(home: Path) -> Path:
    """Where the launchers look for native libraries (the OpenCV codec) on this machine."""
    machine = platform.machine().lower()
    return home / "lib" / f"linux-{_JAVA_ARCH.get(machine, machine)}"


def tool_env(home: Path) -> dict[str, str]:
    """The environment for every dcm4che tool: JAVA_LIBRARY_PATH set, so that the launcher
    starts one JVM and never tries to download a missing OpenCV library into the toolkit's
    folder (one the user set already is kept)."""
    env = dict(os.environ)
    env.setdefault("JAVA_LIBRARY_PATH", str(java_library_path(home)))
    return env


# storescp's INFO lines per message and per object (requests, responses, the write of the
# temporary file) are detail: at our INFO stay connections, associations and objects stored
# (M-RENAME).
_DETAIL_AT_INFO = ("C-STORE-RQ", "C-STORE-RSP", "C-ECHO-RQ", "C-ECHO-RSP", "M-WRITE")


_LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO,
           "WARN": logging.WARNING, "ERROR": logging.ERROR, "FATAL": logging.CRITICAL}
# `05:22:53,916 INFO  - …`: log4j's layout in dcm4che's etc/*/log4j.properties.
_HEADER_RE = re.compile(r"^\d\d:\d\d:\d\d,\d{3} (TRACE|DEBUG|INFO|WARN|ERROR|FATAL) +- ")


def receiver_level(line: str, previous: int) -> int:
    """The log level of one line of storescp's output: its own (`… DEBUG - …`), per-message
    detail at DEBUG, and for the lines a message continues on (PDU and command dumps), that of
    the message."""
    header = _HEADER_RE.match(line)
    if header is None:
        return previous
    level = _LEVELS[header.group(1)]
    if level == logging.INFO and any(mark in line for mark in _DETAIL_AT_INFO):
        return logging.DEBUG
    return level


def tls_args(stores: JavaStores | None, *, require_peer_certificate: bool = True) -> list[str]:
    """The TLS options of dcm4che's storescp/storescu (none: plain DICOM)."""
    if stores is None:
        return []
    args = [arg for cipher in JAVA_TLS_CIPHERS for arg in ("--tls-cipher", cipher)]
    args += [arg for protocol in JAVA_TLS_PROTOCOLS for arg in ("--tls-protocol", protocol)]
    args += ["--key-store", str(stores.key_store), "--key-store-type", "PKCS12",
             "--key-store-pass", stores.key_store_pass]
    if stores.trust_store is not None:
        args += ["--trust-store", str(stores.trust_store), "--trust-store-type", "PKCS12",
                 "--trust-store-pass", stores.trust_store_pass]
    if not require_peer_certificate:
        args.append("--tls-noauth")  # storescp: do not ask modalities for a certificate
    return args


# Received objects are renamed, once complete, to a name storescp makes at random (a UUID):
# by default it names them after the peer's SOP Instance UID, and a UID such as `.hidden`
# (never seen by the watcher) or `1.2.3.part` (taken for an unfinished file) was
# acknowledged and never forwarded. Its temporary file is still `<uid>.part`: unfinished.
FILE_NAME = "{rnd,uuid}.dcm"


def storescp_argv(bin_dir: Path, ae_title: str, host: str, port: int,
                  incoming: Path, tls: list[str] | None = None,
                  idle_timeout: float = 60) -> list[str]:
    # A silent association is aborted after idle_timeout; the association request must be
    # complete within half of it, at most 10 s (as on the other engines; storescp's timer is
    # a deadline: a request sent a byte at a time does not extend it). storescp has no
    # timeout for a C-STORE whose data stops coming (receiver.request_timeout): README.
    negotiation = max(1.0, min(10.0, idle_timeout / 2))
    return [str(bin_dir / "storescp"), "-b", f"{ae_title}@{host}:{port}",
            "--directory", str(incoming), "--filepath", FILE_NAME, "--accept-unknown",
            "--idle-timeout", str(int(idle_timeout * 1000)),
            "--request-timeout", str(int(negotiation * 1000)), *(tls or [])]


def storescp_policy(incoming: Path) -> str:
    """A Java security policy under which storescp may write only inside incoming/.

    dcm4che's storescp names its temporary file from the peer's Affected SOP Instance UID
    unchecked (`new File(directory, iuid + ".part")`, measured on 5.24.0): a UID such as
    `../../x` would write outside the spool. Under this policy that write is refused (the
    association is aborted; the modality got no success) and nothing leaves incoming/."""
    text = str(incoming)
    if any(c in text for c in '"\\\n') or "${" in text:
        raise ValueError(f"spool path {text!r}: a Java policy cannot name it (no quotes, "
                         "backslashes or '${' please)")
    return ("grant {\n"
            '  permission java.io.FilePermission "<<ALL FILES>>", "read,readlink";\n'
            f'  permission java.io.FilePermission "{text}/*", "read,write,delete";\n'
            '  permission java.net.SocketPermission "*", "accept,connect,listen,resolve";\n'
            '  permission java.util.PropertyPermission "*", "read,write";\n'
            '  permission java.lang.RuntimePermission "*";\n'
            '  permission java.lang.reflect.ReflectPermission "*";\n'
            '  permission java.security.SecurityPermission "*";\n'
            '  permission java.util.logging.LoggingPermission "control";\n'
            '  permission javax.net.ssl.SSLPermission "*";\n'
            '  permission java.net.NetPermission "*";\n'
            "};\n")


def java_major(env: dict[str, str]) -> int | None:
    """The major version of the Java the launchers will run ($JAVA_HOME/bin/java, else
    java), or None when it cannot be told."""
    java = str(Path(env["JAVA_HOME"]) / "bin" / "java") if env.get("JAVA_HOME") else "java"
    try:
        proc = run_tool([java, "-version"], timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', proc.stderr + proc.stdout)
    if found is None:
        return None
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major  # "1.8.0" is Java 8


class Dcm4cheReceiver(SupervisedReceiver, Receiver):
    toolkit = "dcm4che"

    def __init__(self, engine: Dcm4cheEngine, config: Config, spool: Spool) -> None:
        rc = config.receiver
        self.spool = spool
        tls = (tls_args(engine.stores(rc.tls),
                        require_peer_certificate=rc.tls.require_peer_certificate)
               if rc.tls is not None else None)
        # One absolute spelling for storescp and its policy: Java compares the paths as
        # written (normalised, symbolic links not followed).
        incoming = Path(os.path.abspath(spool.incoming))
        argv = storescp_argv(engine.bin_dir, rc.ae_title, rc.host, rc.port, incoming, tls,
                             rc.idle_timeout)
        super().__init__(config, argv, host=rc.host, env=self._confined_env(engine, incoming),
                         line_level=receiver_level, writes_to=spool.incoming)

    @staticmethod
    def _confined_env(engine: Dcm4cheEngine, incoming: Path) -> dict[str, str]:
        env = dict(engine.env)
        major = java_major(env)
        # Java 24 removed the Security Manager (JEP 486): the JVM would refuse to start.
        if major is None or major >= 24:
            log.warning("dcm4che's storescp runs WITHOUT its write confinement (Java %s): a "
                        "peer's SOP Instance UID containing '../' can make it write a "
                        "temporary file outside the spool. Use Java 17-23, or another engine.",
                        major or "version unknown")
            return env
        policy = engine.private_folder() / "storescp.policy"
        policy.write_text(storescp_policy(incoming))
        # The launcher passes JAVA_OPTS to java split on spaces: the folder has none.
        env["JAVA_OPTS"] = " ".join(filter(None, [
            env.get("JAVA_OPTS", ""), "-Djava.security.manager",
            f"-Djava.security.policy=={policy}"]))
        return env

    def sweep(self) -> None:
        # storescp renames <uid>.part to a name of its own (FILE_NAME) when complete: a .part
        # left behind (whatever the UID made its name, `.x.part` too) was never finished,
        # and never acknowledged.
        self.spool.quarantine_unfinished(
            sorted(self.spool.incoming.glob("*.part")),  # dot files too
            "storescp stopped while writing it; the sender got no success and sends it again")


def java_tls(stores: JavaStores | None) -> dict[str, object] | None:
    """A destination's TLS for the JVM helper: its key stores, protocols and suites."""
    if stores is None:
        return None
    return {"key_store": str(stores.key_store), "key_store_pass": stores.key_store_pass,
            "trust_store": str(stores.trust_store) if stores.trust_store else None,
            "trust_store_pass": stores.trust_store_pass,
            "protocols": list(JAVA_TLS_PROTOCOLS), "ciphers": list(JAVA_TLS_CIPHERS)}


def results_from_answers(batch: Sequence[Outgoing], answers: Iterable[dict[str, Any]],
                         destination: Destination) -> Iterator[SendResult]:
    """Per-file results from the JVM helper's answers to one send (pure: tested on its own).

    Every file of the batch gets exactly one result: as its C-STORE-RSP arrives, or at the
    end (connection refused, association lost, the JVM died or hung) RETRY, the one that
    was on the wire (`sending` without a result) marked in flight."""
    answered: set[int] = set()
    on_wire: int | None = None
    where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
    for answer in answers:
        ev = answer["ev"]
        if ev == "sending":
            on_wire = int(answer["i"])
            continue
        if ev == "result":
            i = int(answer["i"])
            answered.add(i)
            on_wire = None if on_wire == i else on_wire
            yield result_of(batch[i], answer, destination)
            continue
        rest = [item for i, item in enumerate(batch) if i not in answered]
        message = str(answer.get("message", ""))
        if ev == "error" and answer.get("kind") == "refused-all":
            for item in rest:
                yield SendResult(item.path, Outcome.FAILED, None,
                                 f"{destination.name} {message}: {item.sop_class_uid} in "
                                 f"{item.transfer_syntax}", refused_syntax=True)
        elif ev == "error" and answer.get("kind") == "local":
            yield from local_failures([item.path for item in rest], f"dcm4che: {message}")
        elif ev == "error":
            yield from retry_all([item.path for item in rest], f"{where}: {message}")
        elif ev == "died" and on_wire is None:
            # Our JVM ended (crashed, or killed for hanging) with no object on the wire: not
            # the destination's doing, and no object's either.
            yield from local_failures([item.path for item in rest],
                                      f"dcm4che's JVM died ({message})")
        elif ev in ("lost", "died"):
            what = ("association lost" if ev == "lost" else "dcm4che's JVM died")
            for i, item in enumerate(batch):
                if i in answered:
                    continue
                if i == on_wire:
                    yield SendResult(item.path, Outcome.RETRY, None,
                                     f"no C-STORE response: {what} ({message})", in_flight=True)
                else:
                    yield SendResult(item.path, Outcome.RETRY, None, f"{what} ({message})")
        return
    # The answers stopped without a final one: nothing more is known of the others.
    yield from retry_all([item.path for i, item in enumerate(batch) if i not in answered],
                         "dcm4che's JVM gave no final answer")


def result_of(item: Outgoing, answer: dict[str, Any], destination: Destination) -> SendResult:
    """One file's result answer: a C-STORE status, or why it was not sent."""
    if answer.get("refused"):
        return SendResult(item.path, Outcome.FAILED, None,
                          f"{destination.name} accepts no presentation context for SOP class "
                          f"{item.sop_class_uid} in transfer syntax {item.transfer_syntax}",
                          refused_syntax=True)
    if answer.get("unreadable"):
        return SendResult(item.path, Outcome.FAILED, None,
                          f"dcm4che cannot read it: {answer['unreadable']}")
    if answer.get("broke"):
        return SendResult(item.path, Outcome.RETRY, None,
                          f"no C-STORE response: {answer['broke']}", in_flight=True)
    code = int(answer["status"])
    return SendResult(item.path, classify_status(code), code, answer.get("comment") or "dcm4che")


class Dcm4cheEngine(Engine):
    name = "dcm4che"

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.bin_dir = self.home / "bin"
        if not (self.bin_dir / "storescp").exists():
            raise FileNotFoundError(f"dcm4che's storescp not found in {self.bin_dir} "
                                    "(set [toolkit].dcm4che_home)")
        if not any((self.home / "lib").glob("dcm4che-net-*.jar")):
            raise FileNotFoundError(f"dcm4che's jars (dcm4che-net-*.jar) not found in "
                                    f"{self.home / 'lib'} (set [toolkit].dcm4che_home)")
        self.env = tool_env(self.home)
        self.jvm = JvmBridge(self.home, self.env)
        weakref.finalize(self, self.jvm.close)
        self._stores: dict[TLSConfig, JavaStores] = {}
        self._private: Path | None = None

    def stores(self, tls: TLSConfig) -> JavaStores:
        """Java key stores for a [tls] table, made once per process in a private folder that
        goes when the engine does."""
        if tls not in self._stores:
            self._stores[tls] = java_stores(tls, self.private_folder() / str(len(self._stores)))
        return self._stores[tls]

    def private_folder(self) -> Path:
        """A folder only we can read (0700), made once per process, gone with the engine:
        key stores, the receiver's security policy, the converter's XML."""
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="dicom-relay-dcm4che-"))
            weakref.finalize(self, shutil.rmtree, self._private, True)
        return self._private

    def _destination(self, destination: Destination) -> dict[str, object]:
        return {"ae_title": destination.ae_title, "host": destination.host,
                "port": destination.port,
                "tls": java_tls(self.stores(destination.tls)) if destination.tls else None}

    def describe(self) -> str:
        return f"dcm4che ({self.home})"

    def toolkit_converter(self) -> Dcm4cheEngine:
        return self

    def prepare(self) -> None:
        # Its JVM takes ~0.6 s to start: at relay start-up, not on the first object's time.
        self.jvm.start_soon()

    def receiver(self, config: Config, spool: Spool, beside_work: bool = False,
                 services: Services | None = None) -> Receiver:
        del services  # storescp stores only: the services are on their own port
        return Dcm4cheReceiver(self, config, spool)

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False,
             confirm_each: bool = True) -> Iterator[SendResult]:
        del confirm_each  # each result comes with its response anyway
        ready, unreadable = read_outgoing(files)
        yield from unreadable
        groups = context_groups(ready, lambda item: item.context)
        for i, (batch, contexts) in enumerate(groups):
            try:
                request = {"op": "send", "key": _key(destination, calling_ae),
                           "dest": self._destination(destination), "calling_ae": calling_ae,
                           "timeout": timeout, "contexts": contexts,
                           "keep_open": keep_open and i == len(groups) - 1,
                           "files": [{"path": str(item.path), "cuid": item.sop_class_uid,
                                      "iuid": item.sop_instance_uid, "ts": item.transfer_syntax}
                                     for item in batch]}
                # A hung JVM: no answer for as long as connecting and one object may take.
                answers = self.jvm.call(request, idle_limit=tool_timeout(timeout, 1))
                yield from results_from_answers(batch, answers, destination)
            except (BridgeUnavailable, OSError, ValueError) as exc:
                # ValueError: a [tls] table's files unreadable since start-up (java_stores).
                yield from local_failures([item.path for item in batch],
                                          f"dcm4che's JVM: {exc}")

    def release(self, destination: Destination) -> None:
        request = {"op": "release", "prefix": _key(destination, "")}
        for _ in self.jvm.call(request, idle_limit=30, start=False):
            pass

    def get_by_tool(self, source: Destination, query: Path, model: str, calling_ae: str,
                    folder: Path, timeout: float, storage: list[tuple[str, list[str]]]
                    ) -> JvmGet:
        request = {"op": "get", "key": f"get-{next(_GETS)}", "dest": self._destination(source),
                   "calling_ae": calling_ae, "timeout": timeout, "model": model,
                   "query": str(query), "folder": str(folder), "storage": storage}
        # A hung JVM: no answer for as long as connecting and one object may take.
        return JvmGet(self.jvm, request, idle_limit=tool_timeout(timeout, 1))

    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None:
        try:
            request = {"op": "echo", "dest": self._destination(destination),
                       "calling_ae": calling_ae, "timeout": timeout}
            answers = list(self.jvm.call(request, idle_limit=tool_timeout(timeout, 1)))
        except (BridgeUnavailable, OSError, ValueError) as exc:
            raise ToolFailure(f"local tool failure: dcm4che's JVM: {exc}") from None
        final = answers[-1] if answers else {"ev": "died", "message": "no answer"}
        where = f"{destination.name} ({destination.ae_title}@{destination.host}:" \
                f"{destination.port})"
        if final["ev"] == "done" and final.get("status") == 0:
            return
        if final["ev"] == "done":
            raise DestinationUnavailable(f"{where}: C-ECHO status {final.get('status')}")
        if final["ev"] == "error" and final.get("kind") == "unavailable":
            raise DestinationUnavailable(f"{where}: C-ECHO failed: {final.get('message')}")
        raise ToolFailure(f"local tool failure: dcm4che's JVM: {final.get('message')}")

    # --- the `toolkit` converter -----------------------------------------------------------

    def _convert(self, request: dict[str, object], what: str) -> None:
        try:
            answers = list(self.jvm.call(request, idle_limit=120))
        except BridgeUnavailable as exc:
            raise ValueError(f"{what} failed: dcm4che's JVM: {exc}") from None
        final = answers[-1] if answers else {"ev": "died", "message": "no answer"}
        if final["ev"] != "done":
            raise ValueError(f"{what} failed: {final.get('message')}")

    def to_xml(self, path: Path) -> etree._Element:
        """dcm2xml -B: the PS3.19 XML of the header, group 0002 included, no bulk data."""
        with tempfile.NamedTemporaryFile(suffix=".xml", dir=self.private_folder()) as tmp:
            self._convert({"op": "to_xml", "path": str(path), "out": tmp.name}, "dcm2xml")
            return etree.parse(tmp.name, safe_parser()).getroot()

    def from_xml(self, root: etree._Element, original: Path, out: Path) -> None:
        """xml2dcm -i original: bulk data streamed from it, the XML's attributes merged
        over it."""
        with tempfile.NamedTemporaryFile(suffix=".xml", dir=out.parent) as tmp:
            tmp.write(to_string(root))
            tmp.flush()
            self._convert({"op": "from_xml", "original": str(original), "xml": tmp.name,
                           "out": str(out)}, "xml2dcm")


class JvmGet:
    """A C-GET running in the JVM (engine.get_by_tool): its answers as updates; stop() asks
    the JVM to send a C-CANCEL."""

    def __init__(self, jvm: JvmBridge, request: dict[str, Any], idle_limit: float) -> None:
        self.jvm = jvm
        self.request = request
        self.idle_limit = idle_limit

    def __iter__(self) -> Iterator[GetUpdate]:
        try:
            for answer in self.jvm.call(self.request, idle_limit=self.idle_limit):
                ev = answer["ev"]
                if ev == "stored":
                    yield GetUpdate(path=Path(answer["path"]), uid=str(answer["uid"]))
                elif ev == "rsp":
                    yield GetUpdate(status=int(answer["status"]),
                                    remaining=int(answer["remaining"]),
                                    completed=int(answer["completed"]),
                                    failed=int(answer["failed"]),
                                    warning=int(answer["warning"]))
                elif ev != "done":
                    yield GetUpdate(error=f"dcm4che: {answer.get('message')}")
        except (BridgeUnavailable, OSError) as exc:
            yield GetUpdate(error=f"dcm4che's JVM: {exc}")

    def stop(self) -> None:
        for _ in self.jvm.call({"op": "cancel_get", "key": self.request["key"]},
                               idle_limit=30, start=False):
            pass


def _key(destination: Destination, calling_ae: str) -> str:
    """Which kept association a send may use: per destination and calling AE."""
    return f"{destination.name}\x00{calling_ae}"

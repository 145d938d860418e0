"""The dcm4che engine (the toolkit at /opt/dcm4che-toolkit, bundled in our Docker image).

- storescp (`-b AET@host:port --directory incoming/`) writes `<uid>.part` in the directory
  root and renames it when complete: the watcher never takes a `.part` file.
- storescu sends many files over one association (`-c AET@host:port f1 f2 …`). It exits 0
  even when C-STORE responses carry a failure status (it prints
  `ERROR: Received C-STORE-RSP with Status A700H for MR_small.dcm`): that is how the original
  scripts lost studies. Per-file results come from its log of C-STORE-RSP lines, matched to
  the files by SOP Instance UID; a file without a response line was not stored.
- dcm2xml / xml2dcm are the `toolkit` converter; xml2dcm `-i original` merges the edited XML
  into the original file, so bulk data is streamed from it and never becomes text.

- DICOM TLS: the tools take Java key stores, not PEM files. The engine makes PKCS12 stores
  from the [tls] tables' PEM files at start-up (relay.tls.java_stores) in a private temporary
  folder, and names TLS 1.3/1.2 and forward-secret AEAD suites explicitly (`--tls` alone
  would enable NULL/3DES/RSA suites). The tools always verify the destination's certificate
  against the trust store (there is no switch to turn that off), and they check no host name.

- Every tool is started with JAVA_LIBRARY_PATH set (tool_env): without it each `bin/`
  launcher starts a first JVM only to name the platform, then, when the OpenCV codec library
  is missing (as in a toolkit without lib/<platform>/libopencv_java.so), tries to download it
  into the toolkit's folder and exits 1. With it: one JVM per call, nothing written there.
- storescu reports problems in words, not exit codes, and the adapter reads them: a file it
  cannot read ("Failed to scan file …") or whose SOP class the destination accepts in no
  presentation context (NoPresentationContextException) is never sent and goes to failed/; a
  tool that stops before any network activity (no Java, a broken launcher, a bad option) is
  a local tool failure with its last lines, not "destination unavailable"; when the
  association breaks (or the JVM dies, e.g. decompressing for a destination without OpenCV)
  after a C-STORE-RQ went out unanswered, that object is the one in flight.
- storescp logs every PDU at DEBUG: its lines keep their own level in our log (receiver_level).

Tests run the real toolkit wherever one is found (DCM4CHE_HOME, /opt/dcm4che-toolkit, or the
copy beside the checkout in CI); the output parsing is also tested against quoted recordings
(tests/data/dcm4che/) so that it is checked on a machine without dcm4che.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

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
)
from relay.toolkits.base import Engine, Receiver
from relay.toolkits.common import last_lines, plain_uids, tool_timeout
from relay.toolkits.embedded import EmbeddedEngine
from relay.toolkits.tls import JAVA_TLS_CIPHERS, JAVA_TLS_PROTOCOLS, JavaStores, java_stores

if TYPE_CHECKING:
    from relay.config.model import Config, Destination, TLSConfig
    from relay.services.scp import Services
    from relay.spool import Spool

log = logging.getLogger("relay.dcm4che")

# `>> 2:C-STORE-RSP[pcid=9, status=a700H` then, on a following line, `iuid=<uid> - ?`
_RSP_RE = re.compile(r">> \d+:C-STORE-RSP\[pcid=\d+, status=([0-9A-Fa-f]+)H\s*\n"
                     r"(?:.*\n)*?\s*iuid=(\S+)")
# `<< 2:C-STORE-RQ[pcid=7, prior=0` then `iuid=<uid> - ?`: the object went on the wire.
_RQ_RE = re.compile(r"<< \d+:C-STORE-RQ\[pcid=\d+[^\n]*\n(?:.*\n)*?\s*iuid=(\S+)")
_ECHO_RE = re.compile(r">> \d+:C-ECHO-RSP\[pcid=\d+, status=([0-9A-Fa-f]+)H")
# An exception that is about the data, not the connection (java.net/java.io ones are the
# peer's or the socket's doing).
_JAVA_EXCEPTION_RE = re.compile(r"^(?:Exception in thread \S+ )?(?!java\.(?:net|io)\.)"
                                r"(?:java|javax|org)\.[\w.$]+(?:Exception|Error)\b", re.M)
# storescu failing to decompress: no OpenCV library (its JPEG and JPEG 2000 decoders), or a
# raster its decoder cannot make.
_DECODING_RE = re.compile(r"UnsatisfiedLinkError: .*opencv|incompatible with ColorModel|"
                          r"Decompressor|ImageReader", re.I)
_NO_CONTEXT_RE = re.compile(r"No Presentation Context for Abstract Syntax: ([0-9.]+)")
# What storescu prints once it turns to the network; output without any of these means the
# tool stopped on its own first (launcher, Java, options, files).
_NETWORK_MARKS = ("Initiate connection", "Connected to ", "A-ASSOCIATE", "C-STORE-R",
                  "C-ECHO-R")
# Its one-line summary of what went wrong (`storescu: Connection refused`), or the JVM's.
_PROBLEM_RE = re.compile(r'^(?:storescu: |Exception in thread "[^"]*" )(.+)$', re.M)

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


def reached_network(output: str) -> bool:
    return any(mark in output for mark in _NETWORK_MARKS)


def problem_of(output: str, returncode: int) -> str:
    """storescu's own summary of the failure, else its last lines."""
    found = _PROBLEM_RE.findall(output)
    return f"exit {returncode}: {found[-1] if found else last_lines(output, 2)}"


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


def storescu_argv(bin_dir: Path, files: list[Path], destination: Destination,
                  calling_ae: str, timeout: float, tls: list[str] | None = None) -> list[str]:
    ms = str(int(timeout * 1000))
    return [str(bin_dir / "storescu"), "-b", calling_ae,
            "-c", f"{destination.ae_title}@{destination.host}:{destination.port}",
            "--connect-timeout", ms, "--accept-timeout", ms, *(tls or []),
            *[str(f) for f in files]]


def parse_storescu_output(output: str) -> dict[str, list[int]]:
    """SOP Instance UID → the statuses of its C-STORE responses, in order."""
    statuses: dict[str, list[int]] = {}
    for status, uid in _RSP_RE.findall(output):
        statuses.setdefault(uid, []).append(int(status, 16))
    return statuses


def results_from_output(files: Sequence[Outgoing], output: str,
                        returncode: int) -> list[SendResult]:
    """Per-file results: from C-STORE-RSP lines and storescu's own words, never from the
    exit code alone."""
    if not reached_network(output):
        return local_failures([item.path for item in files],
                              f"storescu stopped before connecting (exit {returncode}): "
                              f"{last_lines(output)}")
    statuses = parse_storescu_output(output)
    no_context = set(_NO_CONTEXT_RE.findall(output))
    # storescu waits for every response before it releases: a C-STORE-RQ that went out and
    # got none is the object on which the association broke off or the JVM died (it then
    # still releases, e.g. after an UnsatisfiedLinkError decompressing without OpenCV).
    requested = set(_RQ_RE.findall(output))
    # The JVM can also die on an object before its C-STORE-RQ goes out (transcoding a data set
    # it cannot decode: "IllegalArgumentException: Raster … incompatible with ColorModel"):
    # storescu sends in the order given, so the first one without any answer was in its hands.
    accepted_at = output.find(">> A-ASSOCIATE-AC")
    died_on_next = (accepted_at >= 0
                    and _JAVA_EXCEPTION_RE.search(output, accepted_at) is not None
                    and not any(uid not in statuses for uid in requested))
    decoding_failed = _DECODING_RE.search(output) is not None
    problem = problem_of(output, returncode)
    results = []
    for item in files:
        path, sop_class, uid = item.path, item.sop_class_uid, item.sop_instance_uid
        answers = statuses.get(uid)
        unread = re.search(rf"^Failed to scan file {re.escape(str(path))}: (.*)\n(.*)",
                           output, re.M)
        if answers:
            code = answers.pop(0)  # two copies of one instance: one answer each, in order
            results.append(SendResult(path, classify_status(code), code, "storescu"))
        elif unread:
            # `Failed to scan file x.dcm: null`, then the exception (java.io.EOFException)
            why = unread.group(1) if unread.group(1) != "null" else unread.group(2).strip()
            results.append(SendResult(path, Outcome.FAILED, None,
                                      f"storescu cannot read it: {why}"))
        elif sop_class in no_context:
            results.append(SendResult(path, Outcome.FAILED, None,
                                      "the destination accepts no presentation context for "
                                      f"SOP class {sop_class}", refused_syntax=True))
        else:
            in_flight = uid in requested or died_on_next
            died_on_next &= not in_flight
            # storescu decompresses an object whose own syntax the peer refused; without
            # OpenCV's library (or with a data set it cannot decode) it dies doing so.
            results.append(SendResult(path, Outcome.RETRY, None,
                                      f"storescu: no C-STORE-RSP for it ({problem})",
                                      in_flight=in_flight,
                                      refused_syntax=in_flight and decoding_failed))
    return results


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


class Dcm4cheEngine(Engine):
    name = "dcm4che"
    # Each storescu is a JVM start (0.5-0.9 s on our machines): gather more per batch.
    batch_wait = 0.3

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.bin_dir = self.home / "bin"
        for tool in ("storescp", "storescu"):
            if not (self.bin_dir / tool).exists():
                raise FileNotFoundError(f"dcm4che's {tool} not found in {self.bin_dir} "
                                        "(set [toolkit].dcm4che_home)")
        self.env = tool_env(self.home)
        # For objects whose UIDs must not reach storescu's file list (plain_uids).
        self.embedded = EmbeddedEngine()
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
        key stores and the receiver's security policy."""
        if self._private is None:
            self._private = Path(tempfile.mkdtemp(prefix="dicom-relay-dcm4che-"))
            weakref.finalize(self, shutil.rmtree, self._private, True)
        return self._private

    def _tls(self, destination: Destination) -> list[str] | None:
        return tls_args(self.stores(destination.tls)) if destination.tls is not None else None

    def describe(self) -> str:
        return f"dcm4che ({self.home})"

    def toolkit_converter(self) -> Dcm4cheEngine:
        return self

    def receiver(self, config: Config, spool: Spool, beside_work: bool = False,
                 services: Services | None = None) -> Receiver:
        del services  # storescp stores only: the services are on their own port
        return Dcm4cheReceiver(self, config, spool)

    def send(self, files: list[Path], destination: Destination, calling_ae: str,
             timeout: float, keep_open: bool = False) -> Iterator[SendResult]:
        # One tool process per call: nothing to keep open between calls.
        outgoing, unreadable = read_outgoing(files)
        yield from unreadable
        # storescu writes each file's UIDs into a list of its own, one line each, tab-
        # separated: a UID holding a newline and tabs made it send a file of the relay's
        # working directory to the PACS. Such objects go by pynetdicom.
        ready = [item for item in outgoing if plain_uids(item)]
        odd = [item.path for item in outgoing if not plain_uids(item)]
        if odd:
            yield from self.embedded.send(odd, destination, calling_ae, timeout)
        if not ready:
            return
        argv = storescu_argv(self.bin_dir, [item.path for item in ready], destination,
                             calling_ae, timeout, self._tls(destination))
        try:
            proc = run_tool(argv, timeout=tool_timeout(timeout, len(ready)), env=self.env)
            output, code = proc.stdout + "\n" + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, code = _text(exc.stdout) + "\n" + _text(exc.stderr), -1
        except OSError as exc:  # gone or not executable since start-up
            yield from local_failures([item.path for item in ready],
                                      f"cannot run {argv[0]}: {exc.strerror or exc}")
            return
        yield from results_from_output(ready, output, code)

    def echo(self, destination: Destination, calling_ae: str, timeout: float) -> None:
        argv = storescu_argv(self.bin_dir, [], destination, calling_ae, timeout,
                             self._tls(destination))
        limit = tool_timeout(timeout, 1)
        try:
            proc = run_tool(argv, timeout=limit, env=self.env)
        except subprocess.TimeoutExpired:
            raise DestinationUnavailable(f"{destination.name}: storescu C-ECHO timed out "
                                         f"after {limit:.0f} s") from None
        except OSError as exc:
            raise ToolFailure(f"local tool failure: cannot run {argv[0]}: "
                              f"{exc.strerror or exc}") from None
        output = proc.stdout + "\n" + proc.stderr
        if not reached_network(output):
            raise ToolFailure(f"local tool failure: dcm4che's storescu stopped before "
                              f"connecting (exit {proc.returncode}): {last_lines(output)}")
        match = _ECHO_RE.search(proc.stdout)
        if proc.returncode != 0 or match is None or int(match.group(1), 16) != 0:
            raise DestinationUnavailable(f"{destination.name}: storescu C-ECHO failed "
                                         f"({problem_of(output, proc.returncode)})")

    # --- the `toolkit` converter -----------------------------------------------------------

    def to_xml(self, path: Path) -> etree._Element:
        """`dcm2xml -B`: the PS3.19 XML of the header, group 0002 included, no bulk data."""
        proc = run_tool([str(self.bin_dir / "dcm2xml"), "-B", str(path)], timeout=120, text=False,
                        env=self.env)
        if proc.returncode != 0:
            raise ValueError(f"dcm2xml failed: {proc.stderr.decode(errors='replace')[-300:]}")
        return etree.fromstring(proc.stdout, safe_parser())

    def from_xml_argv(self, original: Path, xml: Path, out: Path) -> list[str]:
        # -i original: bulk data streamed from it, attributes from the XML merged over it.
        return [str(self.bin_dir / "xml2dcm"), "-i", str(original), "-x", str(xml),
                "-o", str(out)]

    def from_xml(self, root: etree._Element, original: Path, out: Path) -> None:
        with tempfile.NamedTemporaryFile(suffix=".xml", dir=out.parent) as tmp:
            tmp.write(to_string(root))
            tmp.flush()
            proc = run_tool(self.from_xml_argv(original, Path(tmp.name), out), timeout=120,
                            text=False, env=self.env)
        if proc.returncode != 0:
            raise ValueError(f"xml2dcm failed: {proc.stderr.decode(errors='replace')[-300:]}")


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode("utf-8", "replace")
    return data or ""

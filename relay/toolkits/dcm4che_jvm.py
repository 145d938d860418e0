"""The dcm4che engine's long-lived JVM: a helper process that runs dcm4che's own classes for
sending (its Association API) and for the `toolkit` converter (dcm2xml's SAX writer,
xml2dcm's merge), so that no object pays for a JVM start.

Run as `python -m relay.toolkits.dcm4che_jvm DCM4CHE_HOME` by relay.toolkits.dcm4che_bridge,
never by hand. JPype starts the JVM inside this process on the toolkit's own jars (lib/);
the relay talks to it over a pipe, one JSON object per line:

- requests on stdin: {"id": n, "op": "send" | "release" | "echo" | "get" | "cancel_get" |
  "to_xml" | "from_xml", …}
- answers on the original stdout: {"id": n, "ev": …}; a send answers "sending" before it reads
  each file for its C-STORE-RQ (so that the relay knows which object was in hand, or on the
  wire, if this process dies or hangs), "result" as each C-STORE-RSP arrives, then "done";
  a get (a C-GET for query/retrieve) answers "stored" for each object written whole into its
  folder and "rsp" for each C-GET response, then "done"; any request can end in "error".

Why a process of its own: a JVM cannot be restarted inside a process, and one that crashes
(a native codec) or hangs must not take the relay down. The relay kills and restarts this
process instead; the object in flight is set aside as for any broken association.
Java's own System.out goes to stderr (which the relay logs): stdout is the answer channel.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path
from typing import IO, Any

# dcm4che logs through log4j 1.2: warnings and errors only, to stderr (the launchers' INFO
# would write every PDU of every association).
LOG4J = """\
log4j.rootLogger=WARN, stderr
log4j.appender.stderr=org.apache.log4j.ConsoleAppender
log4j.appender.stderr.Target=System.err
log4j.appender.stderr.layout=org.apache.log4j.PatternLayout
log4j.appender.stderr.layout.ConversionPattern=%-5p %c{1} - %m%n
"""

# Failing to connect for one of these is ours to fix (key stores, their passwords, an option),
# not the destination's: a TLS handshake the peer refuses is javax.net.ssl, the peer's doing.
_LOCAL_FAILURES = ("java.security.", "java.io.FileNotFoundException",
                   "org.dcm4che3.net.IncompatibleConnectionException")


def find_libjvm(env: dict[str, str]) -> Path:
    """The libjvm.so of the Java the toolkit's launchers would run: $JAVA_HOME, else the
    `java` on PATH (Debian's alternatives resolved)."""
    if env.get("JAVA_HOME"):
        homes = [Path(env["JAVA_HOME"])]
        where = f"JAVA_HOME={env['JAVA_HOME']}"
    else:
        java = shutil.which("java", path=env.get("PATH"))
        if java is None:
            raise FileNotFoundError("java: not found (no JAVA_HOME, and no java on PATH)")
        homes = [Path(java).resolve().parent.parent]
        where = f"java on PATH ({Path(java).resolve()})"
    for home in homes:
        for candidate in (home / "lib" / "server" / "libjvm.so",
                          home / "jre" / "lib" / "server" / "libjvm.so",  # Java 8
                          *home.glob("jre/lib/*/server/libjvm.so"),
                          *home.glob("lib/*/server/libjvm.so")):
            if candidate.exists():
                return candidate
    raise FileNotFoundError(f"java: not found: no libjvm.so under {where}")


def jvm_options(home: Path, env: dict[str, str], scratch: Path) -> list[str]:
    """Options as the launchers give them: JAVA_LIBRARY_PATH (the OpenCV codec), the user's
    JAVA_OPTS (split on spaces, as the launchers do), our log4j configuration."""
    log4j = scratch / "log4j.properties"
    log4j.write_text(LOG4J)
    options = [f"-Djava.library.path={env.get('JAVA_LIBRARY_PATH', '')}",
               f"-Dlog4j.configuration={log4j.as_uri()}", f"-Ddcm4che.home={home}",
               # The JVM only glues dcm4che's I/O together: the quick compiler alone costs
               # half the CPU over the first thousand objects (the optimising one compiles
               # for seconds) and sends and converts as fast once warm (measured here).
               "-XX:TieredStopAtLevel=1"]
    user = env.get("JAVA_OPTS", "").split()
    if not any(o.startswith("-XX:+Use") and o.endswith("GC") for o in user):
        # One collector thread, not one per core stolen from the relay; a user's choice of
        # collector stands (two would stop the JVM from starting).
        options.append("-XX:+UseSerialGC")
    return options + user


class Answers:
    """The answer channel: whole lines, one writer at a time."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def __call__(self, request_id: int, ev: str, **fields: Any) -> None:
        line = json.dumps({"id": request_id, "ev": ev, **fields}).encode() + b"\n"
        with self.lock:
            self.stream.write(line)
            self.stream.flush()


class Toolkit:
    """dcm4che's classes, looked up once the JVM is up."""

    def __init__(self) -> None:
        from jpype import JClass

        self.Device = JClass("org.dcm4che3.net.Device")
        self.ApplicationEntity = JClass("org.dcm4che3.net.ApplicationEntity")
        self.Connection = JClass("org.dcm4che3.net.Connection")
        self.AAssociateRQ = JClass("org.dcm4che3.net.pdu.AAssociateRQ")
        self.PresentationContext = JClass("org.dcm4che3.net.pdu.PresentationContext")
        self.InputStreamDataWriter = JClass("org.dcm4che3.net.InputStreamDataWriter")
        self.DicomInputStream = JClass("org.dcm4che3.io.DicomInputStream")
        self.IncludeBulkData = JClass("org.dcm4che3.io.DicomInputStream$IncludeBulkData")
        self.SAXWriter = JClass("org.dcm4che3.io.SAXWriter")
        self.Xml2Dcm = JClass("org.dcm4che3.tool.xml2dcm.Xml2Dcm")
        self.Tag = JClass("org.dcm4che3.data.Tag")
        self.Dimse = JClass("org.dcm4che3.net.Dimse")
        self.Commands = JClass("org.dcm4che3.net.Commands")
        self.RoleSelection = JClass("org.dcm4che3.net.pdu.RoleSelection")
        self.DicomOutputStream = JClass("org.dcm4che3.io.DicomOutputStream")
        self.UID = JClass("org.dcm4che3.data.UID")
        self.File = JClass("java.io.File")
        self.FileInputStream = JClass("java.io.FileInputStream")
        self.FileOutputStream = JClass("java.io.FileOutputStream")
        self.BufferedOutputStream = JClass("java.io.BufferedOutputStream")
        self.StreamResult = JClass("javax.xml.transform.stream.StreamResult")
        self.SAXTransformerFactory = JClass("javax.xml.transform.sax.SAXTransformerFactory")
        self.OutputKeys = JClass("javax.xml.transform.OutputKeys")
        executors = JClass("java.util.concurrent.Executors")
        self.executor = executors.newCachedThreadPool()
        self.scheduled = executors.newSingleThreadScheduledExecutor()
        self.transformers = self.SAXTransformerFactory.newInstance()


def java_error(exc: BaseException) -> str:
    """`java.net.ConnectException: Connection refused`: the exception's class and message."""
    name = type(exc).__name__
    java_class = getattr(exc, "getClass", None)
    if java_class is not None:
        name = str(java_class().getName())
        message = exc.getMessage()  # type: ignore[attr-defined]
        return f"{name}: {message}" if message is not None else name
    return f"{name}: {exc}"


class Kept:
    """An association kept open between sends, and the contexts it proposed."""

    def __init__(self, association: Any, proposed: list[tuple[str, str]]) -> None:
        self.association = association
        self.proposed = proposed
        self.lock = threading.Lock()


def store_handler_class() -> type:
    """The C-STORE side of a get: a Java DimseRQHandler implemented in Python (JPype), made
    once the JVM is up."""
    from jpype import JImplements, JOverride

    @JImplements("org.dcm4che3.net.DimseRQHandler")
    class Handler:
        def __init__(self, bridge: Bridge, rid: int, folder: Path) -> None:
            self.bridge = bridge
            self.rid = rid
            self.folder = folder
            self.count = itertools.count(1)

        @JOverride  # type: ignore[untyped-decorator]
        def onDimseRQ(  # noqa: N802 - Java's name
                self, association: Any, pc: Any, dimse: Any, command: Any, data: Any) -> None:
            j = self.bridge.java
            if dimse != j.Dimse.C_STORE_RQ:
                association.tryWriteDimseRSP(pc, j.Commands.mkRSP(command, 0x0211, dimse))
                return
            iuid = str(command.getString(j.Tag.AffectedSOPInstanceUID) or "")
            cuid = str(command.getString(j.Tag.AffectedSOPClassUID) or "")
            n = next(self.count)
            part, whole = self.folder / f".{n}.part", self.folder / f"{n}.dcm"
            status = 0x0000
            try:
                out = j.DicomOutputStream(j.File(str(part)))
                try:
                    out.writeFileMetaInformation(association.createFileMetaInformation(
                        iuid, cuid, pc.getTransferSyntax()))
                    data.copyTo(out)
                finally:
                    out.close()
                os.replace(part, whole)
            except Exception as exc:  # noqa: BLE001 - a failed sub-operation, told
                print(f"get: cannot keep {iuid!r}: {java_error(exc)}", file=sys.stderr,
                      flush=True)
                status = 0xA700  # out of resources
            association.tryWriteDimseRSP(pc, j.Commands.mkCStoreRSP(command, status))
            if status == 0x0000:
                self.bridge.answer(self.rid, "stored", path=str(whole), uid=iuid)

        @JOverride  # type: ignore[untyped-decorator]
        def onClose(self, association: Any) -> None:  # noqa: N802
            return

    return Handler


class Bridge:
    def __init__(self, answer: Answers) -> None:
        self.answer = answer
        self.java = Toolkit()
        self.store_handler = store_handler_class()  # the JVM is up: a Java class can be made
        self.kept: dict[str, Kept] = {}
        self.gets: dict[str, tuple[Any, Any]] = {}  # key → (association, its C-GET's DimseRSP)
        self.lock = threading.Lock()

    # --- associations ----------------------------------------------------------------------

    def connect(self, request: dict[str, Any], contexts: list[tuple[str, str]],
                scp_roles: list[str] | None = None, handler: Any = None,
                offered: list[tuple[str, list[str]]] | None = None) -> Any:
        """An association to request["dest"] proposing `contexts` (a transfer syntax each),
        then `offered` (several each); for the classes in scp_roles, the SCP role too,
        with `handler` taking what the peer sends (the C-STOREs of a C-GET)."""
        j = self.java
        dest, ms = request["dest"], int(request["timeout"] * 1000)
        device = j.Device("dicom-relay")
        ae = j.ApplicationEntity(request["calling_ae"])
        local = j.Connection()
        device.addConnection(local)
        device.addApplicationEntity(ae)
        ae.addConnection(local)
        device.setExecutor(j.executor)
        device.setScheduledExecutor(j.scheduled)
        for conn in (local,):
            conn.setConnectTimeout(ms)
            conn.setAcceptTimeout(ms)
            conn.setResponseTimeout(ms)
            conn.setRetrieveTimeout(ms)  # a C-GET: between two of its responses
            conn.setReleaseTimeout(ms)
        remote = j.Connection()
        remote.setHostname(dest["host"])
        remote.setPort(int(dest["port"]))
        tls = dest.get("tls")
        if tls:
            for conn in (local, remote):
                conn.setTlsCipherSuites(*tls["ciphers"])
                conn.setTlsProtocols(*tls["protocols"])
            device.setKeyStoreURL(Path(tls["key_store"]).as_uri())
            device.setKeyStoreType("PKCS12")
            device.setKeyStorePin(tls["key_store_pass"])
            device.setKeyStoreKeyPin(tls["key_store_pass"])
            if tls.get("trust_store"):
                device.setTrustStoreURL(Path(tls["trust_store"]).as_uri())
                device.setTrustStoreType("PKCS12")
                device.setTrustStorePin(tls["trust_store_pass"])
        if handler is not None:
            device.setDimseRQHandler(handler)
        rq = j.AAssociateRQ()
        rq.setCalledAET(dest["ae_title"])
        for i, (sop_class, syntax) in enumerate(contexts):
            rq.addPresentationContext(j.PresentationContext(2 * i + 1, sop_class, syntax))
        for i, (sop_class, syntaxes) in enumerate(offered or [], start=len(contexts)):
            rq.addPresentationContext(j.PresentationContext(2 * i + 1, sop_class, *syntaxes))
        for sop_class in scp_roles or []:
            rq.addRoleSelection(j.RoleSelection(sop_class, False, True))
        return ae.connect(remote, rq)

    def association_for(self, request: dict[str, Any], contexts: list[tuple[str, str]]
                        ) -> tuple[Any, list[tuple[str, str]]]:
        """The association kept under the request's key if it is up and proposed every context
        needed; else a new one proposing them, then the kept one's (up to 128 in all)."""
        with self.lock:
            kept = self.kept.pop(request["key"], None)
        if kept is not None:
            if kept.association.isReadyForDataTransfer() and \
                    all(cx in kept.proposed for cx in contexts):
                return kept.association, kept.proposed
            self.close(kept.association)
            contexts = (contexts + [cx for cx in kept.proposed if cx not in contexts])[:128]
        return self.connect(request, contexts), contexts

    @staticmethod
    def close(association: Any) -> None:
        try:
            if association.isReadyForDataTransfer():
                association.release()
        except Exception:  # noqa: BLE001 - a broken association is closed anyway
            association.abort()

    # --- operations ------------------------------------------------------------------------

    def send(self, rid: int, request: dict[str, Any]) -> None:
        files = request["files"]
        contexts = [(str(sop_class), str(syntax)) for sop_class, syntax in request["contexts"]]
        try:
            association, proposed = self.association_for(request, contexts)
        except Exception as exc:  # noqa: BLE001 - every way of not connecting is told apart
            self.answer(rid, "error", kind=self.connect_failure(exc), message=java_error(exc))
            return
        keep = False
        try:
            if not any(pc.isAccepted()
                       for pc in association.getAAssociateAC().getPresentationContexts()):
                self.answer(rid, "error", kind="refused-all",
                            message="accepts none of the presentation contexts proposed "
                                    "(SOP class / transfer syntax)")
                return
            accepted: dict[str, set[str]] = {}
            for i, item in enumerate(files):
                if not association.isReadyForDataTransfer():
                    self.answer(rid, "lost", i=i, message=self.why_lost(association))
                    return
                if item["cuid"] not in accepted:
                    accepted[item["cuid"]] = {
                        str(ts) for ts in association.getTransferSyntaxesFor(item["cuid"])}
                if item["ts"] not in accepted[item["cuid"]]:
                    self.answer(rid, "result", i=i, refused=True)
                    continue
                self.store(rid, i, item, association)
            keep = request["keep_open"] and association.isReadyForDataTransfer()
        finally:
            if keep:
                with self.lock:
                    self.kept[request["key"]] = Kept(association, proposed)
            else:
                self.close(association)
        self.answer(rid, "done")

    def store(self, rid: int, i: int, item: dict[str, Any], association: Any) -> None:
        j = self.java
        path = j.File(item["path"])
        # Told before the file is even read: a file whose header makes this JVM crash or
        # hang is then the one set aside, not taken for the JVM's fault with nothing sent.
        self.answer(rid, "sending", i=i)
        try:
            # Read the header as storescu's scan does: a file cut short fails alone, here,
            # and never goes half on the wire.
            dis = j.DicomInputStream(path)
            try:
                dis.setIncludeBulkData(j.IncludeBulkData.NO)
                dis.readFileMetaInformation()
                start = dis.getPosition()
                dis.readDatasetUntilPixelData()
            finally:
                dis.close()
        except Exception as exc:  # noqa: BLE001 - the file's fault: it fails alone
            self.answer(rid, "result", i=i, unreadable=java_error(exc))
            return
        stream = j.FileInputStream(path)
        try:
            stream.skip(start)
            rsp = association.cstore(item["cuid"], item["iuid"], 0,
                                     j.InputStreamDataWriter(stream), item["ts"])
            rsp.next()
            command = rsp.getCommand()
        except Exception as exc:  # noqa: BLE001 - the association broke with it on the wire
            self.answer(rid, "result", i=i, broke=java_error(exc))
            return
        finally:
            stream.close()
        if command is None:
            self.answer(rid, "result", i=i, broke=self.why_lost(association))
            return
        comment = command.getString(j.Tag.ErrorComment)
        self.answer(rid, "result", i=i, status=int(command.getInt(j.Tag.Status, -1)),
                    comment=str(comment) if comment is not None else "")

    @staticmethod
    def why_lost(association: Any) -> str:
        exc = association.getException()
        return java_error(exc) if exc is not None else "association released or aborted"

    @staticmethod
    def connect_failure(exc: BaseException) -> str:
        """How the relay should take a failed connect: the destination's doing
        ("unavailable") or ours ("local": key stores, an incompatible connection)."""
        text = java_error(exc)
        if text.startswith(_LOCAL_FAILURES):
            return "local"
        return "unavailable"

    def release(self, rid: int, request: dict[str, Any]) -> None:
        with self.lock:
            kept = [self.kept.pop(key) for key in list(self.kept)
                    if key.startswith(request["prefix"])]
        for entry in kept:
            self.close(entry.association)
        self.answer(rid, "done")

    def echo(self, rid: int, request: dict[str, Any]) -> None:
        verification = "1.2.840.10008.1.1"
        try:
            association = self.connect(request, [(verification, "1.2.840.10008.1.2")])
        except Exception as exc:  # noqa: BLE001
            self.answer(rid, "error", kind=self.connect_failure(exc), message=java_error(exc))
            return
        try:
            rsp = association.cecho()
            rsp.next()
            status = int(rsp.getCommand().getInt(self.java.Tag.Status, -1))
        except Exception as exc:  # noqa: BLE001
            self.answer(rid, "error", kind="unavailable", message=java_error(exc))
            return
        finally:
            self.close(association)
        self.answer(rid, "done", status=status)

    def get(self, rid: int, request: dict[str, Any]) -> None:
        """A C-GET (GetSCU's way, with dcm4che's Association API): each object the PACS
        stores on the association is written whole into request["folder"] (a dot name,
        renamed when complete; named by a counter, never by the peer's UID) before its
        success goes back; each C-GET response is told with its counts."""
        j = self.java
        keys_in = j.DicomInputStream(j.File(request["query"]))
        try:
            keys = keys_in.readDataset(-1, -1)
        finally:
            keys_in.close()
        offered = [(str(c), [str(t) for t in ts]) for c, ts in request["storage"]]
        handler = self.store_handler(self, rid, Path(request["folder"]))
        try:
            association = self.connect(request, [(request["model"], "1.2.840.10008.1.2")],
                                       [c for c, _ in offered], handler, offered)
        except Exception as exc:  # noqa: BLE001 - every way of not connecting is told apart
            self.answer(rid, "error", kind=self.connect_failure(exc), message=java_error(exc))
            return
        try:
            rsp = association.cget(request["model"], 0, keys, None)
            with self.lock:
                self.gets[request["key"]] = (association, rsp)
            while rsp.next():
                command = rsp.getCommand()
                counts = {name: int(command.getInt(getattr(j.Tag, f"NumberOf{name.title()}"
                                                                  "Suboperations"), 0))
                          for name in ("remaining", "completed", "failed", "warning")}
                self.answer(rid, "rsp", status=int(command.getInt(j.Tag.Status, -1)),
                            **counts)
        except Exception as exc:  # noqa: BLE001 - the association broke, or was aborted
            self.answer(rid, "error", kind="unavailable", message=java_error(exc))
            return
        finally:
            with self.lock:
                self.gets.pop(request["key"], None)
            self.close(association)
        self.answer(rid, "done")

    def cancel_get(self, rid: int, request: dict[str, Any]) -> None:
        """A C-CANCEL for a get in progress (none: it ended already)."""
        with self.lock:
            running = self.gets.get(request["key"])
        if running is not None:
            association, rsp = running
            try:
                rsp.cancel(association)
            except Exception:  # noqa: BLE001 - gone meanwhile: nothing left to cancel
                association.abort()
        self.answer(rid, "done")

    def to_xml(self, rid: int, request: dict[str, Any]) -> None:
        """`dcm2xml -B FILE > OUT`: the PS3.19 XML, bulk data left out, as dcm2xml writes it
        (its SAX writer, keywords on, no namespace declaration, not indented)."""
        j = self.java
        handler = j.transformers.newTransformerHandler()
        transformer = handler.getTransformer()
        transformer.setOutputProperty(j.OutputKeys.INDENT, "no")
        transformer.setOutputProperty(j.OutputKeys.VERSION, "1.0")
        out = j.BufferedOutputStream(j.FileOutputStream(request["out"]))
        dis = j.DicomInputStream(j.File(request["path"]))
        try:
            dis.setIncludeBulkData(j.IncludeBulkData.NO)
            handler.setResult(j.StreamResult(out))
            writer = j.SAXWriter(handler)
            writer.setIncludeKeyword(True)
            writer.setIncludeNamespaceDeclaration(False)
            dis.setDicomInputHandler(writer)
            dis.readDataset(-1, -1)
        finally:
            dis.close()
            out.close()
        self.answer(rid, "done")

    def from_xml(self, rid: int, request: dict[str, Any]) -> None:
        """`xml2dcm -i ORIGINAL -x XML -o OUT`: the XML merged over the original, whose bulk
        data is streamed from it (xml2dcm's own code)."""
        j = self.java
        tool = j.Xml2Dcm()
        tool.setIncludeBulkData(j.IncludeBulkData.URI)
        dis = j.DicomInputStream(j.File(request["original"]))
        try:
            tool.parse(dis)
        finally:
            dis.close()
        tool.mergeXML(request["xml"])
        out = j.BufferedOutputStream(j.FileOutputStream(request["out"]))
        try:
            tool.writeTo(out)
        finally:
            out.close()
            tool.delBulkDataFiles()
        self.answer(rid, "done")

    def handle(self, request: dict[str, Any]) -> None:
        rid = int(request["id"])
        try:
            getattr(self, request["op"])(rid, request)
        except Exception as exc:  # noqa: BLE001 - told to the relay, the bridge stays up
            print(traceback.format_exc(), file=sys.stderr, flush=True)
            self.answer(rid, "error", kind="local", message=java_error(exc))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m relay.toolkits.dcm4che_jvm DCM4CHE_HOME "
              "(started by the relay's dcm4che engine)", file=sys.stderr)
        return 2
    home = Path(argv[1])
    # The relay owns this process's life (it ends when the relay closes our input). A SIGTERM
    # or SIGINT sent to every process at once (systemd's default KillMode, a kill of the
    # process group) would otherwise reach the JVM's own handlers, which abort the process
    # (SIGABRT, an hs_err file) mid-stop. Ignored before the JVM starts, they stay ignored.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = Answers(os.fdopen(os.dup(1), "wb"))
    os.dup2(2, 1)  # System.out and stray prints go to the log, never into the answers
    env = dict(os.environ)
    scratch = Path(tempfile.mkdtemp(prefix="dicom-relay-jvm-"))
    try:
        import jpype

        try:
            libjvm = find_libjvm(env)
            jars = sorted(str(p) for p in (home / "lib").glob("*.jar"))
            if not jars:
                raise FileNotFoundError(f"no jars in {home / 'lib'}")
            jpype.startJVM(str(libjvm), *jvm_options(home, env, scratch), classpath=jars,
                           convertStrings=True, interrupt=False)
            bridge = Bridge(answers)
        except Exception as exc:  # noqa: BLE001 - told to the relay as a local failure
            answers(0, "failed", message=java_error(exc))
            return 1
        version = str(jpype.JClass("java.lang.System").getProperty("java.version"))
        answers(0, "ready", java=version, jvm=str(libjvm))
        # Requests run side by side (a send per destination, conversions per edit worker) on
        # threads that stay: a new thread would attach itself to the JVM for every request,
        # which cost more CPU than the conversion it ran. More requests at once than
        # threads (a relay with dozens of destinations all hanging) wait in the queue.
        workers = concurrent.futures.ThreadPoolExecutor(max_workers=64,
                                                        thread_name_prefix="request")
        for line in sys.stdin.buffer:
            workers.submit(bridge.handle, json.loads(line))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    # The end of our input: the relay closed it, or died (kill -9 too: the pipe's only writer
    # is gone; not PR_SET_PDEATHSIG, which fires when the relay's *thread* that started us
    # ends). Exit now, without waiting for the JVM's idle pool threads.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""The dcm4che adapter's own logic on any machine: storescp's options and output (quoted from
the real dcm4che 5.24.0 tools, tests/data/dcm4che/), and the results made of the JVM helper's
answers. Against the real toolkit: tests/test_dcm4che_real.py."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from lxml import etree
from pydicom import dcmread

from dicomdata import bundled
from relay.config.model import Destination
from relay.edit.dicomxml import safe_parser
from relay.edit.editor import BadInput, Editor
from relay.edit.rules import KeywordRule, XPathRule
from relay.send.results import Outcome, Outgoing
from relay.spool import is_ready
from relay.toolkits import dcm4che_bridge
from relay.toolkits.dcm4che import (
    receiver_level,
    results_from_answers,
    storescp_argv,
    storescp_policy,
)
from relay.toolkits.dcm4che_bridge import JvmBridge
from relay.toolkits.dcm4che_jvm import jvm_options

DATA = Path(__file__).parent / "data" / "dcm4che"
HOME = Path("/opt/dcm4che-toolkit")  # for argv checks: the path in our Docker image
DEST = Destination("central", "PACS", "10.1.2.3", 104)


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def options_in_help(tool: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[\w-]+)", recorded(f"{tool}-help-lines.txt")))


def named(name: str, path: Path | None = None) -> Outgoing:
    """A bundled file as the sender gives it to the adapter."""
    ds = dcmread(bundled(name), stop_before_pixels=True)
    return Outgoing(path or Path(name), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                    str(ds.file_meta.TransferSyntaxUID))


def test_storescp_argv_uses_real_options(tmp_path: Path) -> None:
    argv = storescp_argv(HOME / "bin", "DICOMRELAY", "0.0.0.0", 11112, tmp_path / "incoming")  # noqa: S104
    assert argv == [str(HOME / "bin/storescp"), "-b", "DICOMRELAY@0.0.0.0:11112",
                    "--directory", str(tmp_path / "incoming"), "--filepath", "{rnd,uuid}.dcm",
                    "--accept-unknown", "--idle-timeout", "60000", "--request-timeout", "10000"]
    assert {a for a in argv if a.startswith("-")} <= options_in_help("storescp")


BATCH = [named("CT_small.dcm", Path("ct.dcm")), named("MR_small.dcm", Path("mr.dcm")),
         named("JPEG2000.dcm", Path("j2k.dcm"))]


def _results(*answers: dict[str, object]) -> list[tuple[str, Outcome, int | None, bool]]:
    return [(r.path.name, r.outcome, r.status, r.in_flight)
            for r in results_from_answers(BATCH, list(answers), DEST)]


def test_each_status_as_it_arrives() -> None:
    # CT answered 0000, MR A700 (the PACS is full: later), JPEG 2000 A900 (never).
    assert _results({"ev": "sending", "i": 0}, {"ev": "result", "i": 0, "status": 0},
                    {"ev": "sending", "i": 1}, {"ev": "result", "i": 1, "status": 0xA700},
                    {"ev": "sending", "i": 2},
                    {"ev": "result", "i": 2, "status": 0xA900, "comment": "no match"},
                    {"ev": "done"}) == [
        ("ct.dcm", Outcome.DELIVERED, 0x0000, False), ("mr.dcm", Outcome.RETRY, 0xA700, False),
        ("j2k.dcm", Outcome.FAILED, 0xA900, False)]


def test_the_object_on_the_wire_when_the_jvm_dies_is_the_one_in_flight() -> None:
    results = list(results_from_answers(BATCH, [
        {"ev": "sending", "i": 0}, {"ev": "result", "i": 0, "status": 0},
        {"ev": "sending", "i": 1}, {"ev": "died", "message": "killed by signal 9"}], DEST))
    ct, mr, j2k = results
    assert ct.outcome is Outcome.DELIVERED
    assert mr.outcome is Outcome.RETRY and mr.in_flight and "JVM died" in mr.detail
    assert "killed by signal 9" in mr.detail
    assert j2k.outcome is Outcome.RETRY and not j2k.in_flight and not j2k.local_failure


def test_a_jvm_that_dies_with_nothing_on_the_wire_is_a_local_failure() -> None:
    # Crashed (or killed for hanging) between objects or while connecting: every object
    # not yet answered waits, and the log and metrics blame our tool, not the destination.
    results = list(results_from_answers(BATCH, [
        {"ev": "sending", "i": 0}, {"ev": "result", "i": 0, "status": 0},
        {"ev": "died", "message": "hung: no answer for 6 s, killed"}], DEST))
    ct, mr, j2k = results
    assert ct.outcome is Outcome.DELIVERED
    for r in (mr, j2k):
        assert r.outcome is Outcome.RETRY and r.local_failure and not r.in_flight
        assert "JVM died (hung: no answer for 6 s, killed)" in r.detail


def test_a_broken_association_sets_aside_only_the_object_on_the_wire() -> None:
    assert _results({"ev": "sending", "i": 0},
                    {"ev": "result", "i": 0, "broke": "java.net.SocketException: reset"},
                    {"ev": "lost", "i": 1, "message": "java.net.SocketException: reset"}) == [
        ("ct.dcm", Outcome.RETRY, None, True), ("mr.dcm", Outcome.RETRY, None, False),
        ("j2k.dcm", Outcome.RETRY, None, False)]


def test_what_cannot_be_sent_is_told_apart() -> None:
    ct, mr, j2k = results_from_answers(BATCH, [
        {"ev": "result", "i": 0, "unreadable": "java.io.EOFException"},
        {"ev": "result", "i": 1, "refused": True},
        {"ev": "sending", "i": 2}, {"ev": "result", "i": 2, "status": 0}, {"ev": "done"}],
        DEST)
    assert ct.outcome is Outcome.FAILED
    assert ct.detail == "dcm4che cannot read it: java.io.EOFException"
    assert mr.outcome is Outcome.FAILED and mr.refused_syntax
    assert f"no presentation context for SOP class {BATCH[1].sop_class_uid}" in mr.detail
    assert j2k.outcome is Outcome.DELIVERED


def test_a_refused_connection_keeps_everything_queued_and_sets_nothing_aside() -> None:
    results = list(results_from_answers(BATCH, [
        {"ev": "error", "kind": "unavailable",
         "message": "java.net.ConnectException: Connection refused"}], DEST))
    assert [r.outcome for r in results] == [Outcome.RETRY] * 3
    assert not any(r.in_flight or r.local_failure for r in results)
    assert "PACS@10.1.2.3:104" in results[0].detail and "Connection refused" in results[0].detail


def test_our_own_failures_are_local_and_refused_contexts_fail() -> None:
    local = list(results_from_answers(BATCH, [
        {"ev": "error", "kind": "local", "message": "java.security.KeyStoreException: x"}],
        DEST))
    assert all(r.outcome is Outcome.RETRY and r.local_failure for r in local)
    refused = list(results_from_answers(BATCH, [
        {"ev": "error", "kind": "refused-all", "message": "accepts none"}], DEST))
    assert all(r.outcome is Outcome.FAILED and r.refused_syntax for r in refused)


def test_part_files_of_storescp_are_never_taken() -> None:
    log = recorded("storescp-receive.log")
    written = re.findall(r"M-WRITE (\S+)", log)
    renamed = re.findall(r"M-RENAME \S+ to (\S+)", log)
    assert len(written) == len(renamed) == 2
    assert not any(is_ready(Path(p)) for p in written)
    assert all(is_ready(Path(p)) for p in renamed)


class RecordedConverter:
    """dcm4che's converter with dcm2xml's recorded output; from_xml keeps what it was given
    (a unit test may fake the tool; the argv is checked above)."""

    def __init__(self) -> None:
        self.written: etree._Element | None = None

    def to_xml(self, path: Path) -> etree._Element:
        return etree.fromstring((DATA / "dcm2xml-B-CT_small.xml").read_bytes(), safe_parser())

    def from_xml(self, root: etree._Element, original: Path, out: Path) -> None:
        self.written = root
        shutil.copy(original, out)


def _value(root: etree._Element, keyword: str) -> list[str]:
    return root.xpath(f"/NativeDicomModel/DicomAttribute[@keyword='{keyword}']/Value/text()")


def test_toolkit_converter_applies_rules_to_dcm2xml_output(tmp_path: Path) -> None:
    converter = RecordedConverter()
    rules = [XPathRule('//DicomAttribute[@keyword="PatientID"]/Value', value="NEWID"),
             KeywordRule("SOPInstanceUID", value="1.2.3.4")]
    outcome = Editor(rules, converter).edit(bundled("CT_small.dcm"), tmp_path / "out.dcm")
    assert {c.path for c in outcome.changes} == {
        "PatientID", "OtherPatientIDsSequence[1].PatientID",
        "OtherPatientIDsSequence[2].PatientID", "SOPInstanceUID"}
    assert converter.written is not None
    assert _value(converter.written, "PatientID") == ["NEWID"]
    # xml2dcm keeps group 0002 from the XML: it must name the new instance too.
    assert _value(converter.written, "MediaStorageSOPInstanceUID") == ["1.2.3.4"]


def test_keyword_rules_give_xml2dcm_only_what_they_changed(tmp_path: Path) -> None:
    # Keyword rules name what they touch: the diff looks at those attributes alone (and the
    # file meta's SOP UIDs), and xml2dcm gets exactly the changed ones to merge.
    converter = RecordedConverter()
    rules = [KeywordRule("StudyID", copy_from="PatientID"),  # the same value: no change
             KeywordRule("PatientID", copy_from="InstitutionName"),
             KeywordRule("SOPInstanceUID", value="1.2.3.4")]
    outcome = Editor(rules, converter).edit(bundled("CT_small.dcm"), tmp_path / "out.dcm")
    assert [c.path for c in outcome.changes] == ["SOPInstanceUID", "PatientID"]
    assert converter.written is not None
    assert [n.get("keyword") for n in converter.written] == [
        "MediaStorageSOPInstanceUID", "SOPInstanceUID", "PatientID"]
    assert _value(converter.written, "PatientID") == ["JFK IMAGING CENTER"]
    assert _value(converter.written, "MediaStorageSOPInstanceUID") == ["1.2.3.4"]


def test_toolkit_converter_refuses_deletions(tmp_path: Path) -> None:
    editor = Editor([KeywordRule("InstitutionName", delete=True)], RecordedConverter())
    with pytest.raises(BadInput, match="cannot remove attributes"):
        editor.edit(bundled("CT_small.dcm"), tmp_path / "out.dcm")


def test_storescp_lines_keep_their_level() -> None:
    lines = ["05:22:53,916 INFO  - RELAY<-STORESCU(1) >> A-ASSOCIATE-RQ",
             "05:22:53,922 DEBUG - A-ASSOCIATE-RQ[",
             "  calledAET: RELAY",
             "]",
             "05:22:53,962 INFO  - RELAY<-STORESCU(1): M-WRITE in/1.2.3.part",
             "05:22:53,963 INFO  - RELAY<-STORESCU(1): M-RENAME in/1.2.3.part to in/1.2.3",
             "05:22:53,953 INFO  - RELAY<-STORESCU(1) >> 1:C-STORE-RQ[pcid=5, prior=0",
             "  iuid=1.2.3 - ?",
             "(0000,1000) UI [1.2.3] AffectedSOPInstanceUID",
             "05:23:13,253 WARN  - STORESCU->X(1): unrecognized PDU[type=72, len=1]",
             "05:23:14,000 INFO  - Start TCP Listener on /127.0.0.1:11112"]
    levels = []
    level = logging.INFO
    for line in lines:
        level = receiver_level(line, level)
        levels.append(level)
    assert levels == [logging.INFO, logging.DEBUG, logging.DEBUG, logging.DEBUG, logging.DEBUG,
                      logging.INFO, logging.DEBUG, logging.DEBUG, logging.DEBUG,
                      logging.WARNING, logging.INFO]


def test_storescp_may_write_only_in_incoming() -> None:
    policy = storescp_policy(Path("/srv/dicom_repo/incoming"))
    writes = re.findall(r'FilePermission "([^"]+)", "([^"]+)"', policy)
    assert writes == [("<<ALL FILES>>", "read,readlink"),
                      ("/srv/dicom_repo/incoming/*", "read,write,delete")]
    for bad in ('/srv/a"b', "/srv/a\\b", "/srv/${user.home}"):
        with pytest.raises(ValueError, match="a Java policy cannot name it"):
            storescp_policy(Path(bad))


def test_the_jvm_gets_the_launchers_options_ours_and_then_the_users(tmp_path: Path) -> None:
    env = {"JAVA_LIBRARY_PATH": "/toolkit/lib/linux-x86_64", "JAVA_OPTS": "-Xmx256m"}
    options = jvm_options(Path("/toolkit"), env, tmp_path)
    assert options[0] == "-Djava.library.path=/toolkit/lib/linux-x86_64"
    assert "-XX:TieredStopAtLevel=1" in options and "-XX:+UseSerialGC" in options
    assert options[-1] == "-Xmx256m", "the user's options come last: theirs win"
    assert (tmp_path / "log4j.properties").exists()
    # A collector of the user's own replaces ours: the JVM refuses to start with two.
    env["JAVA_OPTS"] = "-XX:+UseG1GC -XX:TieredStopAtLevel=4"
    options = jvm_options(Path("/toolkit"), env, tmp_path)
    assert "-XX:+UseSerialGC" not in options
    assert options[-2:] == ["-XX:+UseG1GC", "-XX:TieredStopAtLevel=4"]


def test_closing_while_its_jvm_comes_up_ends_that_start_without_waiting_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A relay stopped just after it started must not wait for the helper JVM its start-up
    asked for (up to start_timeout) only to close it: close() ends the start under way, and
    says nothing alarming about it. The helper here is a stand-in that never answers."""
    never_ready = tmp_path / "never-ready"
    never_ready.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    never_ready.chmod(0o755)
    monkeypatch.setattr(dcm4che_bridge, "sys", SimpleNamespace(executable=str(never_ready)))
    bridge = JvmBridge(tmp_path, dict(os.environ), start_timeout=120)
    bridge.start_soon()
    deadline = time.monotonic() + 30
    while bridge._starting is None and time.monotonic() < deadline:
        time.sleep(0.01)
    helper = bridge._starting
    assert helper is not None, "the helper was never started"
    closing = threading.Thread(target=bridge.close, daemon=True)
    closing.start()
    closing.join(timeout=30)  # the old close() waited out the 120 s start
    assert not closing.is_alive(), "close() waited for the JVM coming up"
    assert helper.poll() is not None
    assert not bridge.running()
    time.sleep(0.3)  # the answer reader's last words, if it had any
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_helper_killed_for_hanging_is_not_given_the_next_request(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper that stops answering is killed; the very next request must go to a new one.
    The kill is not instant, and the answer reader reaps the helper meanwhile (holding
    Popen's wait lock, so that poll() says "running"): a request written to the dying
    helper got its "died" back, no object was on the wire, and the sender took the
    destination for down. The helper here is a stand-in that is ready, then never answers."""
    mute = tmp_path / "mute-helper"
    mute.write_text(f"#!{sys.executable}\nimport sys, time\n"
                    "print('{\"id\": 0, \"ev\": \"ready\"}', flush=True)\n"
                    "for line in sys.stdin:\n    time.sleep(120)\n")
    mute.chmod(0o755)
    monkeypatch.setattr(dcm4che_bridge, "sys", SimpleNamespace(executable=str(mute)))
    bridge = JvmBridge(tmp_path, dict(os.environ), start_timeout=60)
    try:
        for attempt in (1, 2, 3):
            answers = list(bridge.call({"op": "echo"}, idle_limit=0.3))
            assert answers == [{"ev": "died", "message": "hung: no answer for 0 s, killed"}], \
                f"attempt {attempt}: {answers}"
            assert not bridge.running(), f"attempt {attempt}: the killed helper looks alive"
            assert bridge.starts == attempt, "each request after a kill goes to a new helper"
    finally:
        bridge.close()

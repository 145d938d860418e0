"""The dcm4che adapter against what the real dcm4che 5.24.0 tools print (tests/data/dcm4che/,
so that the parsing is checked on any machine), and against the real tools wherever a toolkit
is found (peers.find_dcm4che: in CI, the real 5.24.0 toolkit beside the checkout)."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

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
from relay.toolkits.dcm4che import (
    Dcm4cheEngine,
    parse_storescu_output,
    receiver_level,
    results_from_output,
    storescp_argv,
    storescp_policy,
    storescu_argv,
)

DATA = Path(__file__).parent / "data" / "dcm4che"
HOME = Path("/opt/dcm4che-toolkit")  # for argv checks: the path in our Docker image
DEST = Destination("central", "PACS", "10.1.2.3", 104)


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def options_in_help(tool: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[\w-]+)", recorded(f"{tool}-help-lines.txt")))


def uid_of(name: str) -> str:
    return str(dcmread(bundled(name), stop_before_pixels=True).SOPInstanceUID)


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


def test_storescu_argv_sends_many_files_on_one_association() -> None:
    files = [Path("/spool/out/central/a.dcm"), Path("/spool/out/central/b.dcm")]
    argv = storescu_argv(HOME / "bin", files, DEST, "DICOMRELAY", 30)
    assert argv == [str(HOME / "bin/storescu"), "-b", "DICOMRELAY", "-c", "PACS@10.1.2.3:104",
                    "--connect-timeout", "30000", "--accept-timeout", "30000",
                    "/spool/out/central/a.dcm", "/spool/out/central/b.dcm"]
    assert {a for a in argv if a.startswith("-")} <= options_in_help("storescu")


def test_xml2dcm_merges_into_the_original() -> None:
    engine = Dcm4cheEngine.__new__(Dcm4cheEngine)
    engine.bin_dir = HOME / "bin"
    argv = engine.from_xml_argv(Path("orig.dcm"), Path("edit.xml"), Path("out.dcm"))
    assert argv == [str(HOME / "bin/xml2dcm"), "-i", "orig.dcm", "-x", "edit.xml", "-o",
                    "out.dcm"]
    assert {a for a in argv if a.startswith("-")} <= options_in_help("xml2dcm")
    assert "-B" in options_in_help("dcm2xml")


def test_failure_statuses_with_exit_0_are_not_success() -> None:
    # The recording: CT answered 0000, MR A700, JPEG2000 A900 - and storescu exited 0.
    output = recorded("storescu-failure-status.out") + recorded("storescu-failure-status.err")
    assert "exit=0" in output
    files = [named("CT_small.dcm"), named("MR_small.dcm"), named("JPEG2000.dcm")]
    results = results_from_output(files, output, 0)
    assert [(r.path.name, r.outcome, r.status) for r in results] == [
        ("CT_small.dcm", Outcome.DELIVERED, 0x0000),
        ("MR_small.dcm", Outcome.RETRY, 0xA700),
        ("JPEG2000.dcm", Outcome.FAILED, 0xA900),
    ]


def test_success_recording() -> None:
    statuses = parse_storescu_output(recorded("storescu-success.out"))
    assert statuses == {uid_of("CT_small.dcm"): [0], uid_of("MR_small.dcm"): [0]}


def test_refused_connection_keeps_files_queued() -> None:
    output = recorded("storescu-refused.out") + recorded("storescu-refused.err")
    [result] = results_from_output([named("CT_small.dcm")], output, 2)
    assert result.outcome is Outcome.RETRY and "Connection refused" in result.detail
    assert not result.local_failure


def test_a_file_without_response_is_not_delivered() -> None:
    # Only the first response made it (association aborted): the others are not stored.
    text = recorded("storescu-failure-status.out")
    cut = text[: text.index(">> 2:C-STORE-RSP")]
    files = [named("CT_small.dcm"), named("MR_small.dcm")]
    outcomes = [r.outcome for r in results_from_output(files, cut, 0)]
    assert outcomes == [Outcome.DELIVERED, Outcome.RETRY]


def test_what_storescu_cannot_send_is_told_apart() -> None:
    # The recording: CT stored; the cut file not scanned; SOP class 1.2.3.999 without a
    # context; JPEG 2000 sent as request 3, then the JVM died (no OpenCV) and MR never went.
    output = recorded("storescu-cannot-send.out") + recorded("storescu-cannot-send.err")
    files = [named("CT_small.dcm", Path("ct.dcm")),
             Outgoing(Path("cut.dcm"), "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.7", ""),
             Outgoing(Path("unknownclass.dcm"), "1.2.3.999", "1.2.3.4.6", ""),
             named("JPEG2000.dcm", Path("j2k.dcm")), named("MR_small.dcm", Path("mr.dcm"))]
    ct, cut, unknown, j2k, mr = results_from_output(files, output, 1)
    assert ct.outcome is Outcome.DELIVERED
    assert cut.outcome is Outcome.FAILED
    assert cut.detail == "storescu cannot read it: java.io.EOFException"
    assert unknown.outcome is Outcome.FAILED and "SOP class 1.2.3.999" in unknown.detail
    assert j2k.outcome is Outcome.RETRY and j2k.in_flight
    assert "UnsatisfiedLinkError: no opencv_java" in j2k.detail
    assert mr.outcome is Outcome.RETRY and not mr.in_flight and not mr.local_failure


def test_the_object_the_jvm_died_on_before_its_request_is_the_one_in_flight() -> None:
    # CT stored; then the JVM died transcoding the dose file (no C-STORE-RQ for it): that
    # one is set aside (three times: quarantined), not taken for the destination being down.
    output = (recorded("storescu-dies-before-request.out")
              + recorded("storescu-dies-before-request.err"))
    files = [named("CT_small.dcm"), Outgoing(Path("rtdose-class31.dcm"), "31", "31", ""),
             named("MR_small.dcm")]
    ct, dose, mr = results_from_output(files, output, 0)
    assert ct.outcome is Outcome.DELIVERED
    assert dose.outcome is Outcome.RETRY and dose.in_flight
    assert "IllegalArgumentException" in dose.detail
    assert mr.outcome is Outcome.RETRY and not mr.in_flight


def test_a_refused_connection_sets_nothing_aside() -> None:
    output = recorded("storescu-refused.out") + recorded("storescu-refused.err")
    [result] = results_from_output([named("CT_small.dcm")], output, 2)
    assert result.outcome is Outcome.RETRY and not result.in_flight
    assert not result.local_failure


def test_output_without_network_activity_is_a_local_failure() -> None:
    output = "/opt/dcm4che-toolkit/bin/storescu: 105: exec: /usr/lib/jvm/bin/java: not found\n"
    [result] = results_from_output([named("CT_small.dcm")], output, 127)
    assert result.outcome is Outcome.RETRY and result.local_failure
    assert result.detail.startswith("local tool failure: storescu stopped before connecting "
                                    "(exit 127)")
    assert "java: not found" in result.detail


def test_echo_response_is_recognised() -> None:
    from relay.toolkits.dcm4che import _ECHO_RE

    match = _ECHO_RE.search(recorded("storescu-echo.out"))
    assert match is not None and int(match.group(1), 16) == 0


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

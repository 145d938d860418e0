"""The dcm4che adapter against what the real dcm4che 5.24.0 tools print (tests/data/dcm4che/),
and, where /opt/dcm4che-toolkit exists (the Docker test profile), against the real tools."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from lxml import etree
from pydicom import dcmread

from dicomdata import bundled, mixed_study
from peers import Orthanc, RelayProcess, dcmsend, free_port, wait_until
from relay.config import Destination
from relay.dicomxml import safe_parser
from relay.edit import BadInput, Editor
from relay.rules import KeywordRule, XPathRule
from relay.spool import is_ready
from relay.toolkits.base import Outcome
from relay.toolkits.dcm4che import (
    Dcm4cheEngine,
    parse_storescu_output,
    results_from_output,
    storescp_argv,
    storescu_argv,
)

DATA = Path(__file__).parent / "data" / "dcm4che"
HOME = Path("/opt/dcm4che-toolkit")
DEST = Destination("central", "PACS", "10.1.2.3", 104)


def recorded(name: str) -> str:
    return (DATA / name).read_text()


def options_in_help(tool: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[\w-]+)", recorded(f"{tool}-help-lines.txt")))


def uid_of(name: str) -> str:
    return str(dcmread(bundled(name), stop_before_pixels=True).SOPInstanceUID)


def test_storescp_argv_uses_real_options(tmp_path: Path) -> None:
    argv = storescp_argv(HOME / "bin", "DICOMRELAY", "0.0.0.0", 11112, tmp_path / "incoming")  # noqa: S104
    assert argv == [str(HOME / "bin/storescp"), "-b", "DICOMRELAY@0.0.0.0:11112",
                    "--directory", str(tmp_path / "incoming"), "--accept-unknown"]
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
    files = [(Path("CT_small.dcm"), uid_of("CT_small.dcm")),
             (Path("MR_small.dcm"), uid_of("MR_small.dcm")),
             (Path("JPEG2000.dcm"), uid_of("JPEG2000.dcm"))]
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
    [result] = results_from_output([(Path("CT_small.dcm"), uid_of("CT_small.dcm"))], output, 2)
    assert result.outcome is Outcome.RETRY and "connection refused" in result.detail


def test_a_file_without_response_is_not_delivered() -> None:
    # Only the first response made it (association aborted): the others are not stored.
    text = recorded("storescu-failure-status.out")
    cut = text[: text.index(">> 2:C-STORE-RSP")]
    files = [(Path("CT_small.dcm"), uid_of("CT_small.dcm")),
             (Path("MR_small.dcm"), uid_of("MR_small.dcm"))]
    outcomes = [r.outcome for r in results_from_output(files, cut, 0)]
    assert outcomes == [Outcome.DELIVERED, Outcome.RETRY]


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


@pytest.mark.skipif(not HOME.is_dir(), reason="the dcm4che toolkit is not installed at "
                    "/opt/dcm4che-toolkit (it runs in the Docker test profile: "
                    "docker compose -f docker/compose.yml --profile test up)")
@pytest.mark.parametrize("converter", ["embedded", "toolkit"])
def test_dcm4che_relay_end_to_end(tmp_path: Path, orthanc: Orthanc, dcmtk: Path,
                                  converter: str) -> None:
    from test_e2e import write_config

    port = free_port()
    spool = tmp_path / "spool"
    cfg = write_config(tmp_path / "relay.toml", port=port, spool=spool,
                       destinations=[("central", orthanc)], engine="dcm4che",
                       converter=converter)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        sent = mixed_study(tmp_path / "study")
        assert dcmsend(sorted((tmp_path / "study").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: orthanc.count() == len(sent), 120, what="all at Orthanc")
        tags = orthanc.tags_by_sop_uid()
        for uid, info in sent.items():
            assert tags[uid]["PatientID"] == info["ethnic_group"]
    finally:
        assert relay.stop() == 0

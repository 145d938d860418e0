"""The three rule forms on the PS3.19 XML of real headers."""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from dicomdata import bundled, copy_with_new_uids
from relay.edit.dicomxml import dataset_to_xml
from relay.edit.editor import BadInput, Editor, read_dicom
from relay.edit.rules import KeywordRule, MissingSource, RuleError, XPathRule, XSLTRule

# The original relay_process.sh, verbatim.
ORIGINAL_TARGET = '//DicomAttribute[@keyword="PatientID"]/Value'
ORIGINAL_SOURCE = '//DicomAttribute[@keyword="EthnicGroup"]/Value/text()'


def _study(tmp_path: Path, **kw: str) -> Path:
    path = tmp_path / "ct.dcm"
    copy_with_new_uids(bundled("CT_small.dcm"), path, **kw)
    return path


def _with_other_ids(tmp_path: Path) -> Path:
    """CT_small with EthnicGroup and a nested PatientID in OtherPatientIDsSequence."""
    ds = dcmread(bundled("CT_small.dcm"))
    ds.EthnicGroup = "REAL42"
    item = Dataset()
    item.PatientID = "NESTED"
    item.IssuerOfPatientID = "OTHER"
    ds.OtherPatientIDsSequence = Sequence([item])
    path = tmp_path / "nested.dcm"
    ds.save_as(path, enforce_file_format=False)
    return path


def _value(root: etree._Element, keyword: str) -> list[str]:
    return [v.text or "" for v in
            root.xpath(f'/NativeDicomModel/DicomAttribute[@keyword="{keyword}"]/Value')]


def test_keyword_copy_from(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_study(tmp_path, ethnic_group="EG77")))
    KeywordRule("PatientID", copy_from="EthnicGroup").apply(root)
    assert _value(root, "PatientID") == ["EG77"]


def test_keyword_constant_and_delete(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_study(tmp_path, ethnic_group="EG77")))
    KeywordRule("InstitutionName", value="Central Hospital").apply(root)
    KeywordRule("EthnicGroup", delete=True).apply(root)
    assert _value(root, "InstitutionName") == ["Central Hospital"]
    assert _value(root, "EthnicGroup") == []


def test_keyword_creates_absent_target(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_study(tmp_path)))
    assert _value(root, "OtherPatientNames") == []
    KeywordRule("AccessionNumber", value="A1").apply(root)
    assert _value(root, "AccessionNumber") == ["A1"]
    tags = [n.get("tag") for n in root.iterchildren("DicomAttribute")]
    assert tags == sorted(tags), "a created attribute keeps tag order"


def test_keyword_missing_source_raises_before_changing(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_study(tmp_path)))  # CT_small has no EthnicGroup
    before = etree.tostring(root)
    with pytest.raises(MissingSource):
        KeywordRule("PatientID", copy_from="EthnicGroup").apply(root)
    assert etree.tostring(root) == before


def test_keyword_rule_touches_top_level_only(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_with_other_ids(tmp_path)))
    KeywordRule("PatientID", copy_from="EthnicGroup").apply(root)
    assert root.xpath('//DicomAttribute[@keyword="OtherPatientIDsSequence"]'
                      '//DicomAttribute[@keyword="PatientID"]/Value/text()') == ["NESTED"]


def test_original_xpath_lines_verbatim(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_study(tmp_path, ethnic_group="EG77")))
    XPathRule(ORIGINAL_TARGET, value_from_xpath=ORIGINAL_SOURCE).apply(root)
    assert _value(root, "PatientID") == ["EG77"]


def test_original_xpath_also_rewrites_nested_patient_id(tmp_path: Path) -> None:
    # What the seed's xmlstarlet did: `//` reaches into OtherPatientIDsSequence too.
    root = dataset_to_xml(read_dicom(_with_other_ids(tmp_path)))
    XPathRule(ORIGINAL_TARGET, value_from_xpath=ORIGINAL_SOURCE).apply(root)
    assert root.xpath('//DicomAttribute[@keyword="PatientID"]/Value/text()') == ["REAL42"] * 2


def test_xpath_missing_source(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_study(tmp_path)))
    with pytest.raises(MissingSource):
        XPathRule(ORIGINAL_TARGET, value_from_xpath=ORIGINAL_SOURCE).apply(root)


def test_xpath_syntax_error_is_a_rule_error() -> None:
    with pytest.raises(RuleError, match="xpath"):
        XPathRule("//DicomAttribute[", value="x")


COERCE = """<?xml version="1.0"?>
<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:template match="@*|node()"><xsl:copy><xsl:apply-templates select="@*|node()"/></xsl:copy>
  </xsl:template>
  <xsl:template match="DicomAttribute[@keyword='InstitutionName']/Value">
    <Value number="1"><xsl:value-of select="$site"/></Value>
  </xsl:template>
</xsl:stylesheet>
"""


def test_xslt_coercion(tmp_path: Path) -> None:
    xsl = tmp_path / "coerce.xsl"
    xsl.write_text(COERCE.replace('select="$site"', 'select="\'CENTRAL\'"'))
    root = dataset_to_xml(read_dicom(_study(tmp_path)))
    root = XSLTRule(xsl).apply(root)
    assert _value(root, "InstitutionName") == ["CENTRAL"]


def test_xslt_with_params(tmp_path: Path) -> None:
    xsl = tmp_path / "coerce.xsl"
    xsl.write_text(COERCE.replace("<xsl:template match=\"@*",
                                  '<xsl:param name="site"/><xsl:template match="@*', 1))
    root = XSLTRule(xsl, {"site": "FROM-PARAM"}).apply(
        dataset_to_xml(read_dicom(_study(tmp_path))))
    assert _value(root, "InstitutionName") == ["FROM-PARAM"]


def test_xslt_cannot_read_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_text("<s>TOPSECRET</s>")
    xsl = tmp_path / "steal.xsl"
    xsl.write_text(COERCE.replace('select="$site"', f'select="document(\'{secret}\')/s"'))
    with pytest.raises(RuleError):
        XSLTRule(xsl).apply(dataset_to_xml(read_dicom(_study(tmp_path))))


def test_xslt_entities_not_resolved(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    xsl = tmp_path / "xxe.xsl"
    xsl.write_text(COERCE.replace('<?xml version="1.0"?>',
                                  f'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM '
                                  f'"file://{secret}">]>')
                   .replace('select="$site"/>', 'select="\'X\'"/>&e;'))
    try:
        rule = XSLTRule(xsl)
    except RuleError:
        return  # refusing the stylesheet is fine too
    root = rule.apply(dataset_to_xml(read_dicom(_study(tmp_path))))
    assert b"TOPSECRET" not in etree.tostring(root)


def test_on_missing_keep_forwards_unchanged(tmp_path: Path) -> None:
    src = _study(tmp_path)
    out = tmp_path / "out.dcm"
    outcome = Editor([KeywordRule("PatientID", copy_from="EthnicGroup")]).edit(src, out)
    assert outcome.changes == [] and len(outcome.missing) == 1
    assert out.read_bytes() == src.read_bytes()


def test_on_missing_fail_quarantines(tmp_path: Path) -> None:
    rule = KeywordRule("PatientID", copy_from="EthnicGroup", on_missing="fail")
    with pytest.raises(BadInput) as info:
        Editor([rule]).edit(_study(tmp_path), tmp_path / "out.dcm")
    assert info.value.reason == "missing-source"


def test_editor_writes_the_rule_into_the_file(tmp_path: Path) -> None:
    out = tmp_path / "out.dcm"
    outcome = Editor([XPathRule(ORIGINAL_TARGET, value_from_xpath=ORIGINAL_SOURCE)]).edit(
        _study(tmp_path, ethnic_group="EG9", patient_id="OLD"), out)
    # CT_small carries two OtherPatientIDsSequence items: the original XPath reaches them too.
    assert [str(c) for c in outcome.changes] == [
        "PatientID: 'OLD' -> 'EG9'",
        "OtherPatientIDsSequence[1].PatientID: 'ABCD1234' -> 'EG9'",
        "OtherPatientIDsSequence[2].PatientID: '1234ABCD' -> 'EG9'",
    ]
    ds = dcmread(out)
    assert ds.PatientID == "EG9"
    assert [item.PatientID for item in ds.OtherPatientIDsSequence] == ["EG9", "EG9"]
    original = dcmread(bundled("CT_small.dcm")).OtherPatientIDsSequence
    assert [item.TypeOfPatientID for item in ds.OtherPatientIDsSequence] == [
        item.TypeOfPatientID for item in original]


def test_changing_sop_instance_uid_updates_file_meta(tmp_path: Path) -> None:
    out = tmp_path / "out.dcm"
    Editor([KeywordRule("SOPInstanceUID", value="1.2.3.4")]).edit(_study(tmp_path), out)
    ds = dcmread(out)
    assert ds.SOPInstanceUID == "1.2.3.4" == ds.file_meta.MediaStorageSOPInstanceUID


def test_keyword_rules_build_only_the_xml_they_need(tmp_path: Path) -> None:
    src = _study(tmp_path, ethnic_group="EG5", patient_id="OLD")
    keyword = [KeywordRule("PatientID", copy_from="EthnicGroup"),
               KeywordRule("InstitutionName", delete=True)]
    lean = Editor(keyword)
    assert lean.only == {0x00100020, 0x00102160, 0x00080080}
    # A no-op XPath rule forces the whole header into XML: the result must be the same.
    full = Editor([*keyword, XPathRule("//DicomAttribute[@keyword='Nothing']/Value", value="x")])
    assert full.only is None
    a, b = tmp_path / "lean.dcm", tmp_path / "full.dcm"
    assert [str(c) for c in lean.edit(src, a).changes] == [
        str(c) for c in full.edit(src, b).changes]
    assert a.read_bytes() == b.read_bytes()


def _xslt_including(tmp_path: Path, href: str) -> Path:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / "own.xsl").write_text(INCLUDED.replace("TEXT", "OWN"))
    (tmp_path / "outside.xsl").write_text(INCLUDED.replace("TEXT", "TOPSECRET"))
    main = folder / "main.xsl"
    main.write_text(INCLUDING.replace("HREF", href))
    return main


INCLUDED = """<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:template name="site">TEXT</xsl:template>
</xsl:stylesheet>"""
INCLUDING = """<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:include href="HREF"/>
  <xsl:template match="@*|node()">
    <xsl:copy><xsl:apply-templates select="@*|node()"/></xsl:copy>
  </xsl:template>
  <xsl:template match="DicomAttribute[@keyword='PatientID']/Value">
    <Value number="1"><xsl:call-template name="site"/></Value>
  </xsl:template>
</xsl:stylesheet>"""


def test_xslt_includes_only_from_its_own_folder(tmp_path: Path) -> None:
    root = dataset_to_xml(read_dicom(_study(tmp_path)))
    assert _value(XSLTRule(_xslt_including(tmp_path, "own.xsl")).apply(root),
                  "PatientID") == ["OWN"]
    for href in ("../outside.xsl", str(tmp_path / "outside.xsl"), "file:///etc/passwd",
                 "http://127.0.0.1:1/x.xsl"):
        with pytest.raises(RuleError, match="not a valid stylesheet|own folder"):
            XSLTRule(_xslt_including(tmp_path, href))


@pytest.mark.parametrize(("value", "why"), [
    ("R" * 70_000, "is too long to be read into the rule"),
    ("REAL\x0142", "holds control characters or bytes that are not text"),
    ("REAL\t42", "holds control characters"),
])
def test_a_source_value_the_rule_cannot_use_is_on_missings_case(
        tmp_path: Path, value: str, why: str) -> None:
    """An EthnicGroup over 64 KB or with control characters was logged as "absent" and
    PatientID forwarded unchanged. It is on_missing's case still, said as what it is."""
    ds = dcmread(bundled("CT_small.dcm"))
    ds.EthnicGroup = value
    src = tmp_path / "odd.dcm"
    ds.save_as(src, enforce_file_format=False)
    keep = Editor([KeywordRule("PatientID", copy_from="EthnicGroup")]).edit(
        src, tmp_path / "kept.dcm")
    assert keep.changes == [] and len(keep.missing) == 1
    assert f"EthnicGroup cannot be used: its value {why}" in keep.missing[0]
    with pytest.raises(BadInput, match=why) as info:
        Editor([KeywordRule("PatientID", copy_from="EthnicGroup", on_missing="fail")]).edit(
            src, tmp_path / "failed.dcm")
    assert info.value.reason == "missing-source"
    # The original XPath lines: the same, said in the XPath's words.
    xpath = Editor([XPathRule(ORIGINAL_TARGET, ORIGINAL_SOURCE)]).edit(src, None)
    assert xpath.changes == [] and len(xpath.missing) == 1
    said = {"is too long": "selects nothing (the attribute is there, but its value is too "
                           "long to be read into the rule",
            "holds control characters or": "selects nothing (the attribute is there, but its "
                                           "value holds control characters or bytes",
            "holds control characters": "the value it selects holds control characters"}
    assert next(v for k, v in said.items() if why.startswith(k)) in xpath.missing[0]

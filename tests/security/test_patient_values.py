"""`[audit].patient_values = false` keeps patient values out of the audit log, and (issue 23)
out of the failed/ sidecars, the log lines and `dicom-relay status` too: a sidecar said
"PatientID 'SECRET-…' matches none of …", INFO lines printed old -> new values."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import bundled
from peers import EG_RULE, RelayProcess, ScriptedSCP, dcmsend, free_port, relay_config, wait_until

pytestmark = pytest.mark.e2e

# A stylesheet that fails, quoting the object's PatientID, on one object: a rule's error
# that holds a patient value (the detail of failed/rule-error/).
FAILING_XSLT = """<xsl:stylesheet version="1.0" xmlns:xsl="http://www.w3.org/1999/XSL/Transform">
  <xsl:template match="@*|node()">
    <xsl:copy><xsl:apply-templates select="@*|node()"/></xsl:copy>
  </xsl:template>
  <xsl:template match="/NativeDicomModel">
    <xsl:if test="DicomAttribute[@keyword='EthnicGroup']/Value = 'BOOM-3333'">
      <xsl:message terminate="yes">cannot take <xsl:value-of
        select="DicomAttribute[@keyword='PatientID']/Value"/></xsl:message>
    </xsl:if>
    <xsl:copy><xsl:apply-templates select="@*|node()"/></xsl:copy>
  </xsl:template>
</xsl:stylesheet>
"""
SECRETS = ("ORIG-SECRET-9", "KEEP-1111", "SECRET-2222", "BOOM-3333")


def _object(folder: Path, number: int, ethnic_group: str) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(bundled("CT_small.dcm"))
    uid = f"1.2.826.0.1.3680043.10.543.77.{number}"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.PatientID = "ORIG-SECRET-9"
    ds.EthnicGroup = ethnic_group
    path = folder / f"{number}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_no_patient_value_in_sidecars_logs_or_status(tmp_path: Path, dcmtk: Path) -> None:
    (tmp_path / "fail.xsl").write_text(FAILING_XSLT)
    sink = ScriptedSCP()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool,
                       rules=EG_RULE + f'[[rules]]\nxslt = "{tmp_path / "fail.xsl"}"\n',
                       destinations=[("sink", "SCRIPTED", sink.port,
                                      '[destinations.filter]\nPatientID = "KEEP*"\n')],
                       extra="[audit]\npatient_values = false\n")
    folder = tmp_path / "study"
    folder.mkdir()
    files = [_object(folder, 1, "KEEP-1111"), _object(folder, 2, "SECRET-2222"),
             _object(folder, 3, "BOOM-3333")]
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        dcmsend(files, port, "DICOMRELAY")
        wait_until(lambda: len(sink.received) == 1, 30, what="the routed object delivered")
        wait_until(lambda: len(list((spool / "failed").rglob("*.json"))) == 2, 30,
                   what="the unrouted and the failing object quarantined")
    finally:
        relay.stop()
        sink.close()
    status = subprocess.run([sys.executable, "-m", "relay", "status", "--config", str(cfg)],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    sidecars = {p.parent.name: p.read_text() for p in (spool / "failed").rglob("*.json")}
    assert set(sidecars) == {"unrouted", "rule-error"}
    places = {"log": relay.log_path.read_text(), "status": status,
              "audit": (spool / "audit.jsonl").read_text(), **sidecars}
    for secret in SECRETS:
        leaks = [where for where, text in places.items() if secret in text]
        assert leaks == [], f"{secret} in {leaks}"
    # What they say instead: why, without the values.
    assert "refused by its filter's PatientID" in sidecars["unrouted"]
    assert "patient_values = false" in sidecars["rule-error"]
    assert "PatientID changed" in places["log"]

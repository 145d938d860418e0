"""The audit log is an interface: admins parse its lines. A routed study (filters, a
destination's own rules, de-identification, a held study, a refusal and a retry) must write
the very lines, field for field and in the same order of fields, that the relay wrote before
the event stream replaced the hand-written reports.

tests/data/audit/routed-study.jsonl was recorded by this scenario on the relay as it was
before that change (commit 2b3f234), with times and the random part of spool names taken
out. Set RECORD_AUDIT_GOLDEN=1 to record it again (only ever from that commit)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import bundled
from peers import EG_RULE, RelayProcess, ScriptedSCP, dcmsend, free_port, relay_config, wait_until

pytestmark = pytest.mark.e2e
GOLDEN = Path(__file__).parent / "data" / "audit" / "routed-study.jsonl"
STUDY = "1.2.826.0.1.3680043.10.543.1"


class Once(dict):  # type: ignore[type-arg]
    """Scripted statuses answered once each (then success): a PACS out of room, once."""

    def get(self, key, default=None):  # noqa: ANN001, ANN201
        return self.pop(key, default)


def _study(folder: Path) -> list[Path]:
    """Six objects of one study with fixed UIDs: three CT, three MR, numbered 1-6."""
    folder.mkdir()
    files = []
    for number in range(1, 7):
        source = "CT_small.dcm" if number <= 3 else "MR_small.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(bundled(source))
        uid = f"{STUDY}.{number}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.StudyInstanceUID = STUDY
        ds.SeriesInstanceUID = f"{STUDY}.{100 + (number - 1) // 3}"
        ds.InstanceNumber = number
        ds.PatientID = "ORIGINAL-1"
        ds.EthnicGroup = "REAL-ID-42"
        path = folder / f"{number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def _normalised(audit: Path) -> list[str]:
    """Each line as written, without what differs from run to run (times, the random part
    of spool names), in a stable order (several threads write the log)."""
    lines = []
    for line in audit.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        entry.pop("time")
        entry.pop("arrived", None)
        entry["object"] = re.sub(r"~[0-9a-f]{12}\.dcm$", "~X.dcm", entry["object"])
        lines.append(json.dumps(entry, ensure_ascii=False))
    return sorted(lines)


def test_a_routed_study_writes_the_same_audit_lines_as_before(tmp_path: Path, dcmtk: Path
                                                                ) -> None:
    (tmp_path / "secret").write_bytes(b"k" * 32)
    diagnostic = ScriptedSCP(ae_title="DIAG")
    backup = ScriptedSCP(statuses=Once({5: 0xA900, 6: 0xA700}), ae_title="BACKUP")
    research = ScriptedSCP(ae_title="RESEARCH")
    port = free_port()
    spool = tmp_path / "spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, rules=EG_RULE,
                       destinations=[
                           ("diagnostic", "DIAG", diagnostic.port,
                            '[destinations.filter]\nModality = "CT"\n'
                            '[[destinations.rules]]\nset = "InstitutionName"\n'
                            'value = "CENTRAL"\n'),
                           ("backup", "BACKUP", backup.port,
                            'hold_until_stable = 1\n'),
                           ("research", "RESEARCH", research.port,
                            '[destinations.filter]\nModality = "MR"\n'
                            '[[destinations.rules]]\ndeidentify = "basic"\n'
                            f'secret_file = "{tmp_path / "secret"}"\n')])
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        dcmsend(_study(tmp_path / "study"), port, "DICOMRELAY")
        wait_until(lambda: (len(diagnostic.received), len(backup.received),
                            len(research.received)) == (3, 5, 3), 60,
                   what="each destination has its objects (backup: all but the refused one)")
        wait_until(lambda: not any((spool / "out").rglob("*.dcm")), 30,
                   what="the queues are empty")
    finally:
        relay.stop()
        for scp in (diagnostic, backup, research):
            scp.close()
    lines = _normalised(spool / "audit.jsonl")
    if os.environ.get("RECORD_AUDIT_GOLDEN") == "1":
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        GOLDEN.write_text("\n".join(lines) + "\n", encoding="utf-8")
        pytest.skip(f"recorded {GOLDEN}")
    assert lines == GOLDEN.read_text(encoding="utf-8").splitlines()

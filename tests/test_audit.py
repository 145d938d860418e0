"""The audit log holds patient values: only the relay's user may read it, like the spool's
objects (0600), whatever the umask, and also when an older version left it 0644."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from relay.ops.audit import AuditLog


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_audit_log_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        audit = AuditLog(tmp_path / "audit.jsonl")
        audit.record("received", "a.dcm", calling_ae="CT01")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "audit.jsonl") == 0o600
    assert json.loads((tmp_path / "audit.jsonl").read_text())["calling_ae"] == "CT01"


def test_an_existing_readable_audit_log_is_narrowed_and_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"step": "received", "object": "old.dcm"}\n')
    path.chmod(0o644)
    AuditLog(path).record("delivered", "new.dcm", destination="central")
    assert _mode(path) == 0o600
    assert [json.loads(line)["object"] for line in path.read_text().splitlines()] == [
        "old.dcm", "new.dcm"]

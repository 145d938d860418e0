"""The audit log: one JSON line per object and step, for whoever must answer "what happened to
this image": received, edited (rules applied, old -> new values), delivered where with which
status, deferred, failed why. `[audit].patient_values = false` leaves the values out."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

from relay.dicomxml import AttributeChange


class AuditLog:
    def __init__(self, path: Path | None, *, patient_values: bool = True) -> None:
        self.path = path
        self.patient_values = patient_values
        self._lock = threading.Lock()
        self._file: Any = None  # opened on first use, kept open (rotate with copytruncate)

    def record(self, step: str, obj: str, **fields: Any) -> None:
        if self.path is None:
            return
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
                 + f".{int(time.time() * 1000) % 1000:03d}Z", "step": step, "object": obj}
        entry.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock:
            if self._file is None:
                self._file = self._open(self.path)
            self._file.write(line)
            self._file.flush()

    @staticmethod
    def _open(path: Path) -> Any:
        """Append, readable by the relay's user only, like the spool's objects: the log holds
        patient values. A log an older version created 0644 is narrowed to 0600."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def changes(self, changes: list[AttributeChange]) -> list[dict[str, Any]]:
        """Rule results for the log: with old -> new values, or only the attribute names."""
        if self.patient_values:
            return [{"attribute": c.path, "before": c.before, "after": c.after}
                    for c in changes]
        return [{"attribute": c.path} for c in changes]


NO_AUDIT = AuditLog(None)

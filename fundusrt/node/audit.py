"""The audit log: one JSON line per study event, appended and fsync'd.

Events: ``received`` (first instance of a study, or of a new run of it), ``processed``,
``sent`` (to a DICOM destination or an output folder), ``failed`` (with the reason), ``resumed``
(picked up again after a restart). Lines carry UIDs and counts, never patient names or IDs.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
from pathlib import Path
from typing import Any


class AuditLog:
    """Append-only JSON-lines audit file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def write(self, event: str, study_uid: str, **details: Any) -> None:
        """Append one line: time (UTC, ISO 8601), event, study UID and `details`."""
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
                  "event": event, "study_instance_uid": study_uid, **details}
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
        with self._lock, open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every record so far (for tests and `fundusrt serve` status tools)."""
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

"""The spool: where received instances and results live on disk, written durably, named by UID.

Layout under the spool root::

    state.sqlite            durable state (fundusrt.node.state)
    audit.log               one JSON line per study event (fundusrt.node.audit)
    incoming/<study>/<sop>.dcm
    results/<study>/<generation>/...
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from fundusrt.manifest import atomic_write_bytes

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class SpoolError(ValueError):
    """An instance cannot be spooled (a malformed UID, for instance)."""


def check_uid(uid: str, what: str) -> str:
    """`uid` if it is a well-formed DICOM UID (digits and dots, at most 64 characters); it names files."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.match(uid):
        raise SpoolError(f"{what} {uid!r} is not a valid DICOM UID (digits and dots, at most 64 characters)")
    return uid


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation in `path` durable (POSIX: fsync the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes) -> Path:
    """Write `data` atomically and fsync both the file and its directory, so it survives a power cut."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)
    fsync_dir(path.parent)
    return path


class Spool:
    """Paths of the spool and durable writes into it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.results = self.root / "results"
        for folder in (self.incoming, self.results):
            folder.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        """The SQLite state file."""
        return self.root / "state.sqlite"

    @property
    def audit_path(self) -> Path:
        """The audit log."""
        return self.root / "audit.log"

    def study_dir(self, study_uid: str) -> Path:
        """Folder of a study's received instances."""
        return self.incoming / check_uid(study_uid, "StudyInstanceUID")

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance (a DICOM Part 10 file) durably; returns its path."""
        path = self.study_dir(study_uid) / f"{check_uid(sop_uid, 'SOPInstanceUID')}.dcm"
        return durable_write(path, data)

    def fresh_results_dir(self, study_uid: str, generation: int) -> Path:
        """An empty folder for the results of one run (left-overs of an interrupted run are removed)."""
        path = self.results / check_uid(study_uid, "StudyInstanceUID") / str(generation)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

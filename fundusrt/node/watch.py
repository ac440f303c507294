"""Watch-folder mode: DICOM files that appear in a folder are ingested like received instances.

Source files are only read, never moved, changed or deleted; a file is taken once its size and
modification time have stayed the same for one poll (so half-copied files are not read), and
files seen before are skipped by (path, size, mtime) in memory and by SOPInstanceUID in the
state file across restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fundusrt.node")


class FolderWatcher:
    """Polls a folder (recursively) and calls `ingest(data)` for each new, settled file."""

    def __init__(self, folder: Path, ingest: Callable[[bytes], int], poll_seconds: float) -> None:
        self.folder = Path(folder)
        self.ingest = ingest
        self.poll_seconds = poll_seconds
        self._seen: dict[Path, tuple[int, int]] = {}
        self._pending: dict[Path, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fundusrt-watch", daemon=True)

    def start(self) -> None:
        """Start polling in a background thread."""
        if not self.folder.is_dir():
            raise FileNotFoundError(f"watch folder {self.folder} does not exist or is not a folder")
        self._thread.start()

    def stop(self) -> None:
        """Stop polling and wait for the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def scan_once(self) -> int:
        """Ingest every file that settled since the last scan; returns how many were handed over."""
        handed = 0
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            try:
                stat = path.stat()
            except OSError:
                continue  # removed while scanning
            signature = (stat.st_size, stat.st_mtime_ns)
            if self._seen.get(path) == signature:
                continue
            if self._pending.get(path) != signature:
                self._pending[path] = signature  # wait one poll for the size and time to settle
                continue
            del self._pending[path]
            self._seen[path] = signature
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("watch folder: cannot read %s: %s", path.name, exc.strerror)
                continue
            self.ingest(data)
            handed += 1
        return handed

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.scan_once()
            except Exception:  # the watcher must survive one bad scan (a vanished folder, ...)
                log.exception("watch folder scan failed; retrying at the next poll")

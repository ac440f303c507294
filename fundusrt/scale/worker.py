"""Screening one batch of studies: what a Ray actor (or the in-process runner) does with its loaded package.

Per study, the same calls as `fundusrt run --dicom-out`: `Pipeline.run_study`, then `write_results` (SR,
captures, PDF, JSON report). The results go into a fresh folder that is renamed into place as a whole,
with a record of the run beside them (``screen.json``); a study whose folder is already there for the
same package and protocol (a batch retried after its worker died, a run resumed after the driver died)
is not screened again: its rows are rebuilt from that record and its objects, which keep their SOP
Instance UIDs, are posted again if asked (storing an instance twice does not duplicate it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fundusrt.scale.sources import StudyRef
from fundusrt.scale.table import failed_row, rows_from_report

log = logging.getLogger("fundusrt.scale")
RECORD_NAME = "screen.json"
_UID = re.compile(r"^[0-9.]{1,64}$")


@dataclass(frozen=True)
class ScreenSettings:
    """Everything a worker needs to screen studies (plain values: it travels to Ray actors).

    Attributes:
        package: the model package folder.
        out_dir: the run's output folder; study results go to ``out_dir/studies/<key>/``.
        protocol: a protocol file over the package's own (None: as `fundusrt run` chooses).
        backend / threads: as for `fundusrt run`.
        max_new_tokens: answer length limit of the free-text questions.
        write_pdf: add the Encapsulated PDF report.
        stow_url: post the DICOM results to this DICOMweb service (STOW-RS).
    """

    package: str
    out_dir: str
    protocol: str | None = None
    backend: str = "ort-cpu"
    threads: int | None = None
    max_new_tokens: int = 128
    write_pdf: bool = False
    stow_url: str | None = None


def study_folder(out_dir: Path, key: str) -> Path:
    """Where the results of study `key` go: ``studies/<StudyInstanceUID>`` (a hash for other keys)."""
    name = key if _UID.match(key) else "key-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return out_dir / "studies" / name


class StudyScreener:
    """Holds one loaded package; called with a batch of study references, returns their result rows.

    Ray Data builds one per actor (`map_batches` with an actor pool); the in-process runner builds one.
    """

    def __init__(self, settings: ScreenSettings) -> None:
        from fundusrt.config import GenerationConfig
        from fundusrt.runtime.pipeline import load_package

        start = time.perf_counter()
        self.settings = settings
        self.out_dir = Path(settings.out_dir)
        self.pipeline = load_package(settings.package, backend=settings.backend, threads=settings.threads,
                                     protocol=settings.protocol)
        self.gen = GenerationConfig(max_new_tokens=settings.max_new_tokens)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        # what the results depend on: a results folder made with other values is screened again
        self.identity = {"package_sha256": self.pipeline.manifest_sha256,
                         "protocol_sha256": self.pipeline.protocol.sha256,
                         "max_new_tokens": settings.max_new_tokens, "write_pdf": settings.write_pdf}
        self.load_seconds = time.perf_counter() - start
        log.info("worker %s loaded %s in %.2f s", self.worker, settings.package, self.load_seconds)

    def __call__(self, batch: Any) -> Any:
        """Ray Data entry point: a pyarrow Table of plan rows in, a pyarrow Table of result rows out."""
        from fundusrt.scale.table import to_arrow

        return to_arrow([row for ref in batch.to_pylist() for row in self.screen(StudyRef.from_row(ref))])

    def screen(self, ref: StudyRef) -> list[dict[str, Any]]:
        """The rows of one study: one per eye, or one failed row with the reason. Never raises for a bad study."""
        start = time.perf_counter()
        attempt = {"attempt_id": uuid.uuid4().hex, "worker": self.worker, "load_seconds": self.load_seconds}
        if ref.problem is not None:
            return [failed_row(ref, ref.problem, self._meta(start, attempt))]
        try:
            folder, record = self._results(ref)
        except Exception as exc:  # one bad study must not sink the batch: it gets a row with the reason
            if not isinstance(exc, (ValueError, OSError, RuntimeError)):
                log.exception("unexpected error screening %s", ref.key)
            return [failed_row(ref, _reason(exc), self._meta(start, attempt))]
        meta = self._meta(start, {**attempt, **record["timings"]})
        meta["results_dir"] = str(folder)
        stow_error = None
        if self.settings.stow_url is not None:
            stow_error, meta["stowed"] = self._stow(folder)
        report = json.loads(next(folder.glob("report_*.json")).read_text())
        rows = rows_from_report(ref, report, meta)
        if stow_error is not None:  # screened, but not delivered: failed, so that --resume posts it again
            for row in rows:
                row.update(status="failed", reason=stow_error)
        return rows

    def _meta(self, start: float, extra: dict[str, Any]) -> dict[str, Any]:
        return {**extra, "seconds": time.perf_counter() - start, "completed_at": datetime.now(timezone.utc)}

    def _results(self, ref: StudyRef) -> tuple[Path, dict[str, Any]]:
        """The study's results folder and its record, screening the study unless it was already done."""
        from fundusrt.dicom.results import write_results

        folder = study_folder(self.out_dir, ref.key)
        record_path = folder / RECORD_NAME
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            if {k: record.get(k) for k in self.identity} == self.identity:
                return folder, record
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
        try:
            fetch_start = time.perf_counter()
            files = list(ref.files) or self._fetch(ref, work / "source")
            fetch_s = time.perf_counter() - fetch_start
            run_start = time.perf_counter()
            report = self.pipeline.run_study(files, gen=self.gen)
            run_s = time.perf_counter() - run_start
            write_start = time.perf_counter()
            write_results(report, work / "results", write_pdf=self.settings.write_pdf)
            record = {**self.identity, "key": ref.key, "worker": self.worker,
                      "timings": {"fetch_seconds": fetch_s, "screen_seconds": run_s,
                                  "write_seconds": time.perf_counter() - write_start}}
            (work / "results" / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
            if folder.exists():  # results of another package or protocol: superseded
                shutil.rmtree(folder)
            os.replace(work / "results", folder)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return folder, record

    def _fetch(self, ref: StudyRef, into: Path) -> list[str]:
        from fundusrt.dicom.dicomweb import connect, retrieve_study

        if ref.url is None:
            raise ValueError("the study has no files and no DICOMweb URL")
        paths = retrieve_study(connect(ref.url), ref.key, into)
        if not paths:
            raise ValueError(f"WADO-RS returned no instances for study {ref.key}")
        return [str(p) for p in paths]

    def _stow(self, folder: Path) -> tuple[str | None, int]:
        from fundusrt.dicom.dicomweb import DicomWebError, StowError, stow

        try:
            outcomes = stow(self.settings.stow_url, sorted(folder.glob("*.dcm")))
        except StowError as exc:
            return f"STOW-RS: {exc}", sum(o.stored for o in exc.outcomes)
        except DicomWebError as exc:
            return f"STOW-RS: {exc}", 0
        return None, len(outcomes)


def _reason(exc: BaseException) -> str:
    # Messages of the reader and runtime name files and UIDs, never patients.
    return " ".join(f"{type(exc).__name__}: {exc}".split())


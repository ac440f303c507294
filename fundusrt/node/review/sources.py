"""Where the review page's studies come from: the live node (`NodeSource`) or a results folder (`FolderSource`).

Both give the same `Study` records, keep sign-offs in a `StateStore` and events in an `AuditLog`, and
deliver sign-off SRs: the node wherever it sends results, the folder to an optional destination AE.
Patient name and ID are read from the DICOM headers for the page only; they are never logged.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.node.audit import AuditLog
from fundusrt.node.config import Destination
from fundusrt.node.sender import send_files
from fundusrt.node.state import DONE, FAILED, SENDING, StateStore

log = logging.getLogger("fundusrt.review")


@dataclass
class Study:
    """One study as the page shows it.

    Attributes:
        status: the node's state (received, processing, sending, done, failed); "done" for a results folder.
        reason: why it failed (or why a delivery is being retried).
        arrived / updated: epoch seconds of its first instance (or of the report file) and of the last change.
        report: the study report's JSON form (None until it is processed); its images' sources are files.
        ai_sr_path: the AI's SR beside the report.
        root: folder that relative source paths of the report are tried against.
    """

    study_uid: str
    status: str
    reason: str
    arrived: float
    updated: float
    patient_name: str = ""
    patient_id: str = ""
    report: dict[str, Any] | None = None
    ai_sr_path: Path | None = None
    root: Path | None = None
    images: int = 0

    @property
    def decision(self) -> str | None:
        """The AI's patient-level decision (refer, no_refer, ungradable), None before it is screened."""
        return ((self.report or {}).get("screening") or {}).get("decision")

    @property
    def can_sign_off(self) -> bool:
        """Results exist and no new run is under way."""
        return self.report is not None and self.ai_sr_path is not None and self.status in (DONE, SENDING, FAILED)

    def image_path(self, sop_instance_uid: str) -> Path | None:
        """The source file of an image of the report, None when it is not (any longer) on disk."""
        for image in (self.report or {}).get("images", []):
            if image["sop_instance_uid"] == sop_instance_uid:
                source = Path(image["source"])
                candidates = [source] + ([self.root / source] if self.root and not source.is_absolute() else [])
                return next((p for p in candidates if p.is_file()), None)
        return None


def _patient(path: Path) -> tuple[str, str]:
    pydicom = require("pydicom")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
    except Exception:  # an unreadable header leaves the name empty; the page still works
        return "", ""
    return str(ds.get("PatientName", "") or ""), str(ds.get("PatientID", "") or "")


@dataclass
class _Cache:
    """Reports and patient headers read once: result files are never rewritten, instances never change."""

    reports: dict[Path, dict[str, Any] | None] = field(default_factory=dict)
    patients: dict[Path, tuple[str, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, path: Path) -> dict[str, Any] | None:
        """The report's JSON; None (said once in the log) when it is unreadable, so one bad file hides only itself."""
        with self.lock:
            if path not in self.reports:
                try:
                    self.reports[path] = json.loads(path.read_text())
                except (OSError, ValueError) as exc:
                    log.warning("cannot read the report %s (left out of the worklist): %s", path, exc)
                    self.reports[path] = None
            return self.reports[path]

    def patient(self, path: Path) -> tuple[str, str]:
        with self.lock:
            if path not in self.patients:
                self.patients[path] = _patient(path)
            return self.patients[path]


class NodeSource:
    """The studies of a running `fundusrt.node.Node`, read from its state and spool."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self.state: StateStore = node.state
        self.audit: AuditLog = node.audit
        self._cache = _Cache()

    def studies(self) -> list[Study]:
        """Every study the node knows, oldest first."""
        return [self._study(row) for row in self.state.studies()]

    def study(self, study_uid: str) -> Study | None:
        """One study, None when unknown."""
        row = self.state.study(study_uid)
        return self._study(row) if row is not None else None

    def _study(self, row: Any) -> Study:
        outputs = self.state.outputs(row.study_uid)
        report_path = next((path for sop, path in outputs if sop.startswith("json:")), None)
        sr_path = next((path for _, path in outputs if path.name.startswith("SR_")), None)
        report = self._cache.report(report_path) if report_path is not None else None
        instances = self.state.instance_paths(row.study_uid)
        name, patient_id = self._cache.patient(sr_path or instances[0]) if (sr_path or instances) else ("", "")
        return Study(row.study_uid, row.state, row.reason, row.first_received, row.updated, name, patient_id,
                     report, sr_path, None, len(instances))

    def signoff_path(self, study: Study, sop_instance_uid: str) -> Path:
        """Where a sign-off SR is written: beside the AI's results in the spool."""
        return self.node.spool.results / study.study_uid / "signoffs" / f"SO_{sop_instance_uid}.dcm"

    def deliver(self, study_uid: str, path: Path) -> None:
        """Send a sign-off SR wherever the node sends results (raises SendError/OSError)."""
        self.node.deliver_files(study_uid, [path], [path])

    def close(self) -> None:
        """Nothing to close: the node owns its state."""


class FolderSource:
    """Results written by `fundusrt run --dicom-out` (``report_<SR UID>.json`` beside ``SR_<SR UID>.dcm``),
    anywhere under `root`; the newest run of each study is shown.

    Sign-offs are written beside the AI's SR; their state and audit log are ``review-state.sqlite`` and
    ``review-audit.log`` in `root`.
    """

    def __init__(self, root: str | Path, destination: Destination | None = None, ae_title: str = "FUNDUSRT") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a folder of results (fundusrt run --dicom-out DIR)")
        self.destination, self.ae_title = destination, ae_title
        self.state = StateStore(self.root / "review-state.sqlite")
        self.audit = AuditLog(self.root / "review-audit.log")
        self._cache = _Cache()

    def studies(self) -> list[Study]:
        """The newest run of every study under the folder, oldest first."""
        newest: dict[str, Study] = {}
        for path in self.root.rglob("report_*.json"):
            report = self._cache.report(path)
            if not isinstance(report, dict) or not isinstance(report.get("images"), list):
                continue
            mtime = path.stat().st_mtime
            sr_path = path.with_name(f"SR_{path.stem.removeprefix('report_')}.dcm")
            uid = str(report.get("study_instance_uid") or path.stem.removeprefix("report_"))
            if uid in newest and newest[uid].updated >= mtime:
                continue
            found = sr_path.is_file()
            name, patient_id = self._cache.patient(sr_path) if found else ("", "")
            newest[uid] = Study(uid, DONE if found else FAILED, "" if found else f"no {sr_path.name} beside "
                                f"{path.name}", mtime, mtime, name, patient_id, report, sr_path if found else None,
                                path.parent, len(report["images"]))
        return sorted(newest.values(), key=lambda s: s.arrived)

    def study(self, study_uid: str) -> Study | None:
        """One study, None when unknown."""
        return next((s for s in self.studies() if s.study_uid == study_uid), None)

    def signoff_path(self, study: Study, sop_instance_uid: str) -> Path:
        """Where a sign-off SR is written: beside the AI's SR."""
        assert study.ai_sr_path is not None
        return study.ai_sr_path.with_name(f"SO_{sop_instance_uid}.dcm")

    def deliver(self, study_uid: str, path: Path) -> None:
        """Send a sign-off SR to the destination AE, if one was given (raises SendError/OSError)."""
        if self.destination is not None:
            sent = send_files([path], self.destination, self.ae_title)
            dest = self.destination
            self.audit.write("sent", study_uid, to=f"{dest.ae_title}@{dest.host}:{dest.port}", instances=sent)

    def close(self) -> None:
        """Close the sign-off state."""
        self.state.close()


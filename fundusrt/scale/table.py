"""The results table of a screening run: Parquet, one row per eye (a failed study: one row with its reason).

While a run goes on, every batch of results is written as its own Parquet part file (temp file, then
rename), so that whatever was recorded survives the driver being killed; at the end the parts and the
earlier table are compacted into ``results.parquet`` (again temp file, then rename), keeping for each
study the rows of its latest attempt only. The table is the record `--resume` reads.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.scale.sources import StudyRef

TABLE_NAME = "results.parquet"
PARTS_DIR = "results.parts"
DONE, FAILED = "done", "failed"


def schema() -> Any:
    """The pyarrow schema of the results table."""
    pa = require("pyarrow", "the results table of `fundusrt screen`")
    item = pa.struct([("item", pa.string()), ("answer", pa.string()),
                      ("probabilities", pa.map_(pa.string(), pa.float64()))])
    return pa.schema([
        ("study_key", pa.string()),  # StudyInstanceUID, or file:/folder:PATH for an item that is no study
        ("study_instance_uid", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),  # done / failed
        ("reason", pa.string()),  # why it failed
        ("eye", pa.string()),  # R, L, unknown; null on a failed row
        ("patient_decision", pa.string()),
        ("eye_decision", pa.string()),
        ("eye_referral_probability", pa.float64()),
        ("eye_gradable", pa.bool_()),
        ("items", pa.list_(item)),  # the eye's protocol items: answer and option probabilities
        ("images", pa.int32()),  # images of this eye that were screened
        ("files_not_used", pa.list_(pa.string())),  # files of the study left out, with the reason
        ("package_name", pa.string()),
        ("package_sha256", pa.string()),
        ("protocol_name", pa.string()),
        ("protocol_version", pa.string()),
        ("protocol_sha256", pa.string()),
        ("results_dir", pa.string()),
        ("stowed", pa.int32()),  # objects posted with STOW-RS (null: not asked)
        ("fetch_seconds", pa.float64()),
        ("screen_seconds", pa.float64()),
        ("write_seconds", pa.float64()),
        ("seconds", pa.float64()),  # the study in the worker, all included
        ("load_seconds", pa.float64()),  # the worker's package load, once per worker
        ("worker", pa.string()),  # host:pid
        ("attempt_id", pa.string()),
        ("completed_at", pa.timestamp("ms", tz="UTC")),
    ])


def failed_row(ref: StudyRef, reason: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The one row of a study that could not be screened."""
    return {"study_key": ref.key, "source": ref.source, "status": FAILED, "reason": reason, **meta}


def rows_from_report(ref: StudyRef, report: dict[str, Any], meta: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per eye of a JSON report (`StudyReport.to_dict`), with the run facts in `meta`."""
    screening = report.get("screening") or {}
    protocol = screening.get("protocol") or {}
    package = report.get("package") or {}
    common = {"study_key": ref.key, "study_instance_uid": report.get("study_instance_uid"), "source": ref.source,
              "status": DONE, "patient_decision": screening.get("decision"),
              "files_not_used": [f"{e['file']}: {e['status']}: {e['reason']}" for e in report.get("errors", [])],
              "package_name": package.get("name"), "package_sha256": package.get("manifest_sha256"),
              "protocol_name": protocol.get("name"), "protocol_version": protocol.get("version"),
              "protocol_sha256": protocol.get("sha256"), **meta}
    return [{**common, "eye": eye, "eye_decision": data.get("decision"),
             "eye_referral_probability": data.get("referral_probability"), "eye_gradable": data.get("gradable"),
             "images": len(data.get("images", [])),
             "items": [{"item": item_id, "answer": item["answer"], "probabilities": item["probabilities"]}
                       for item_id, item in (data.get("items") or {}).items()]}
            for eye, data in report["eyes"].items()]


def to_arrow(rows: list[dict[str, Any]]) -> Any:
    """Rows as a pyarrow Table of the results schema (missing columns are null)."""
    pa = require("pyarrow")
    fields = schema()
    return pa.Table.from_pylist([{name: row.get(name) for name in fields.names} for row in rows], schema=fields)


class ResultsTable:
    """The results table of the run in `out_dir`: parts appended during the run, compacted at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / TABLE_NAME
        self.parts = out_dir / PARTS_DIR

    def exists(self) -> bool:
        """True when a table or parts from an earlier run are there."""
        return self.path.exists() or any(self.parts.glob("*.parquet"))

    def append(self, table: Any) -> None:
        """Record a batch of rows: a new part file, written atomically."""
        pq = require("pyarrow.parquet", "the results table of `fundusrt screen`")
        if table.num_rows == 0:
            return
        self.parts.mkdir(parents=True, exist_ok=True)
        name = f"part-{datetime.now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:12]}.parquet"
        _atomic_parquet(pq, table.cast(schema()), self.parts / name)

    def read(self) -> Any:
        """Everything recorded so far (the table and the parts), latest attempt per study only."""
        pa = require("pyarrow")
        pq = require("pyarrow.parquet")
        pieces = [pq.read_table(p) for p in self._files()]
        table = pa.concat_tables(pieces).cast(schema()) if pieces else schema().empty_table()
        return latest_attempts(table)

    def completed(self) -> set[str]:
        """Keys of the studies screened (status done); failed ones are screened again by `--resume`."""
        table = self.read()
        return {key for key, status in zip(table.column("study_key").to_pylist(),
                                           table.column("status").to_pylist(), strict=True) if status == DONE}

    def compact(self) -> Any:
        """Fold the parts into the table (latest attempt per study), atomically; returns the table."""
        pq = require("pyarrow.parquet")
        parts = [p for p in self._files() if p != self.path]
        table = self.read()
        _atomic_parquet(pq, table.sort_by([("study_key", "ascending"), ("eye", "ascending")]), self.path)
        for part in parts:
            part.unlink()
        return table

    def _files(self) -> list[Path]:
        return ([self.path] if self.path.exists() else []) + sorted(self.parts.glob("*.parquet"))


def latest_attempts(table: Any) -> Any:
    """Keep, per study key, only the rows of its most recent attempt (by completion time)."""
    pa = require("pyarrow")
    keys = table.column("study_key").to_pylist()
    attempts = table.column("attempt_id").to_pylist()
    times = table.column("completed_at").to_pylist()
    latest: dict[str, tuple[Any, str]] = {}
    for key, attempt, when in zip(keys, attempts, times, strict=True):
        if key not in latest or when > latest[key][0]:
            latest[key] = (when, attempt)
    keep = [latest[key][1] == attempt for key, attempt in zip(keys, attempts, strict=True)]
    return table.filter(pa.array(keep, type=pa.bool_()))


def _atomic_parquet(pq: Any, table: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summarise(table: Any, extra: Iterable[tuple[str, Any]] = ()) -> dict[str, Any]:
    """Counts of a results table: studies done and failed, eyes, patient and eye decisions."""
    rows = table.select(["study_key", "status", "patient_decision", "eye_decision", "reason"]).to_pylist()
    studies: dict[str, dict[str, Any]] = {}
    eye_decisions: dict[str, int] = {}
    for row in rows:
        studies.setdefault(row["study_key"], row)
        if row["status"] == DONE:
            eye_decisions[row["eye_decision"]] = eye_decisions.get(row["eye_decision"], 0) + 1
    patient: dict[str, int] = {}
    for row in studies.values():
        if row["status"] == DONE:
            patient[row["patient_decision"]] = patient.get(row["patient_decision"], 0) + 1
    failed = {k: r["reason"] for k, r in studies.items() if r["status"] == FAILED}
    return {"studies": len(studies), "done": len(studies) - len(failed), "failed": len(failed),
            "eyes": sum(eye_decisions.values()), "patient_decisions": patient, "eye_decisions": eye_decisions,
            "failures": failed, **dict(extra)}

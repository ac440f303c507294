"""Write the DICOM results of one study run: the SR, a Secondary Capture per image with boxes, the PDF."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.dicom.capture import build_capture, build_encapsulated_pdf
from fundusrt.dicom.findings import study_findings
from fundusrt.dicom.pdf_report import build_pdf_report
from fundusrt.dicom.sr import ResultWriteError, build_sr, load_sources, save_dataset
from fundusrt.manifest import atomic_write_text


@dataclass(frozen=True)
class ResultFile:
    """A written result: its SOP Instance UID (None for the JSON report) and path."""

    sop_instance_uid: str | None
    path: Path


@dataclass(frozen=True)
class WrittenResults:
    """What `write_results` wrote, and what it left out with the reason (also in the JSON report)."""

    files: list[ResultFile]
    warnings: list[str]


def write_results(report: Any, out_dir: str | Path, write_pdf: bool = False) -> WrittenResults:
    """Write the SR, one capture per image that has boxes, the PDF if asked, and the JSON report into `out_dir`.

    Files are named by kind and SOP Instance UID (``SR_<uid>.dcm``, ``SC_<uid>.dcm``, ``PDF_<uid>.dcm``,
    ``report_<SR uid>.json``); none is written over an existing file. What cannot be written (a box the
    model wrote inverted, a capture whose frame no longer decodes) is left out of the DICOM results and
    listed, with the reason, under ``result_warnings`` in the JSON report; the rest is written.
    """
    hd = require("highdicom", "writing DICOM results")
    out_dir = Path(out_dir)
    data = report.to_dict() if hasattr(report, "to_dict") else report
    sources = load_sources(data)
    sr = build_sr(data, sources)
    written = [ResultFile(sr.SOPInstanceUID, save_dataset(sr, out_dir / f"SR_{sr.SOPInstanceUID}.dcm"))]
    eyes = study_findings(data)
    warnings = [f"dropped {problem}" for eye in eyes for problem in eye.dropped]
    source_paths = {image["sop_instance_uid"]: image["source"] for image in data["images"]}
    by_frame: dict[tuple[str, int], list] = {}
    for eye in eyes:
        for lesion in eye.lesions:
            by_frame.setdefault((lesion.sop_instance_uid, lesion.frame_index), []).append(lesion)
    capture_series = hd.UID()
    for number, ((sop_uid, frame), lesions) in enumerate(sorted(by_frame.items()), 1):
        try:
            sc = build_capture(source_paths[sop_uid], lesions, frame, number, capture_series, sources[sop_uid])
        except ResultWriteError as exc:  # the SR still holds these boxes; only the picture is missing
            warnings.append(f"no Secondary Capture of image {sop_uid} frame {frame + 1}: {exc}")
            continue
        written.append(ResultFile(sc.SOPInstanceUID, save_dataset(sc, out_dir / f"SC_{sc.SOPInstanceUID}.dcm")))
    if write_pdf:
        pdf = build_encapsulated_pdf(build_pdf_report(data, eyes, sources), list(sources.values()))
        written.append(ResultFile(pdf.SOPInstanceUID, save_dataset(pdf, out_dir / f"PDF_{pdf.SOPInstanceUID}.dcm")))
    json_path = out_dir / f"report_{sr.SOPInstanceUID}.json"
    atomic_write_text(json_path, json.dumps({**data, "result_warnings": warnings}, indent=2, ensure_ascii=False)
                      + "\n")
    written.append(ResultFile(None, json_path))
    return WrittenResults(written, warnings)

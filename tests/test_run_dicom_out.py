"""`fundusrt run --dicom-out DIR`: the study's findings as DICOM (SR, captures with boxes, PDF) beside the text.

The command runs as a process on a tiny exported package (built once, hence slow); the written objects are
read back with pydicom, compared with the source files and the JSON report, and checked with dciodvfy when
dicom3tools is installed. The capture path, which a random tiny model never reaches (it grounds no boxes), is
checked through `write_results` with the answers a perfect model gives (the synth ground truth).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest

from fundusrt.dicom.findings import parse_boxes
from fundusrt.dicom.results import write_results
from fundusrt.synth import write_study
from tests.test_dicom_results import dciodvfy_errors, report_from_truth

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
          "StudyID", "AccessionNumber")


# `fundusrt run` in a fresh interpreter where the build side cannot be imported, as on a Jetson: the DICOM
# writers (highdicom, fundusrt.dicom.results) must not pull torch in either.
NO_TORCH_RUN = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers") or name.startswith(("fundusrt.models", "fundusrt.export")):
            raise ImportError(f"{name} is blocked: the runtime must not import it")
sys.meta_path.insert(0, Refuse())
from fundusrt.cli import main
sys.exit(main(["run", *sys.argv[1:]]))
"""


def fundusrt_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH_RUN, *args], capture_output=True, text=True, timeout=300)


def evidence(ds: Any) -> set[str]:
    return {ref.ReferencedSOPInstanceUID for s in ds.CurrentRequestedProcedureEvidenceSequence
            for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}


def content_items(ds: Any) -> list[Any]:
    items, stack = [], list(ds.ContentSequence)
    while stack:
        items.append(stack.pop())
        stack.extend(items[-1].get("ContentSequence", []))
    return items


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package("internvit-shuffle", seed=1)[1]


@pytest.mark.slow
def test_run_writes_valid_dicom_results(package: Path, tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", seed=4, size=(256, 256))
    sources = {p: p.read_bytes() for p in study.files}
    out = tmp_path / "dicom" / "new"  # created by the command
    proc = fundusrt_run(str(study.out_dir), "--package", str(package), "--max-new-tokens", "6", "--threads", "1",
                        "--json", str(tmp_path / "report.json"), "--dicom-out", str(out), "--pdf")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    written = sorted(Path(line.removeprefix("wrote ")) for line in proc.stdout.splitlines()
                     if line.startswith("wrote "))
    assert written == sorted(out.iterdir())
    assert proc.stdout.startswith(f"Study {study.study_instance_uid}")  # the text report comes first, as without

    by_class: dict[str, list[Any]] = {}
    for path in written:
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
            assert path.name.endswith(f"_{ds.SOPInstanceUID}.dcm")
            assert dciodvfy_errors(path) == [], path.name
    (sr,) = by_class.pop(COMPREHENSIVE_SR)
    (pdf,) = by_class.pop(ENCAPSULATED_PDF)
    boxed_frames = {(image["sop_instance_uid"], image["frame_index"]) for image in report["images"]
                    for answer in image["answers"] if parse_boxes(answer["answer"])[0]}
    assert len(by_class.pop(SECONDARY_CAPTURE, [])) == len(boxed_frames) and by_class == {}

    first = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    for ds in (sr, pdf):
        for keyword in COPIED:
            assert ds.get(keyword) == first.get(keyword), keyword
        assert ds.SOPInstanceUID not in study.instances
        assert ds.SeriesInstanceUID not in {e["series_instance_uid"] for e in study.instances.values()}
    assert evidence(sr) == {image["sop_instance_uid"] for image in report["images"]} == set(study.instances)
    texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue for item in content_items(sr)
             if item.ValueType == "TEXT"}
    assert texts["Algorithm Name"] == report["package"]["name"]
    (json_copy,) = out.glob("report_*.json")
    assert json_copy.name == f"report_{sr.SOPInstanceUID}.json"
    assert json.loads(json_copy.read_text())["images"] == report["images"]
    assert {p: p.read_bytes() for p in study.files} == sources  # sources untouched

    # A second run into the same folder adds new objects and leaves the first ones as they were.
    before = {p: p.read_bytes() for p in written}
    again = fundusrt_run(str(study.out_dir), "--package", str(package), "--max-new-tokens", "6", "--threads", "1",
                         "--dicom-out", str(out))
    assert again.returncode == 0, again.stderr
    assert len(list(out.glob("SR_*.dcm"))) == 2
    assert {p: p.read_bytes() for p in written} == before


@pytest.mark.slow
def test_run_reports_an_unusable_dicom_out_after_the_findings(package: Path, tmp_path: Path) -> None:
    study = write_study(tmp_path / "study", seed=2, variants=("op",), size=(256, 256))
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    proc = fundusrt_run(str(study.out_dir), "--package", str(package), "--max-new-tokens", "4",
                        "--dicom-out", str(not_a_folder))
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"Study {study.study_instance_uid}")  # the findings are still shown
    assert "cannot write DICOM results" in proc.stderr and "is not a folder" in proc.stderr
    assert "Traceback" not in proc.stderr and not_a_folder.read_text() == "x"


def test_pdf_needs_dicom_out(tmp_path: Path) -> None:
    proc = fundusrt_run(str(tmp_path), "--package", str(tmp_path), "--pdf")
    assert proc.returncode == 2 and "--dicom-out" in proc.stderr and "Traceback" not in proc.stderr


def test_results_hold_a_capture_per_boxed_frame(tmp_path: Path) -> None:
    # Seed 5 gives lesion boxes in both eyes; the stereo variant puts boxes on frames of one instance.
    study = write_study(tmp_path / "study", seed=5, variants=("op", "op-stereo"), transfer_syntaxes=("explicit-le",),
                        size=(256, 256))
    report = report_from_truth(study)
    for image in report["images"]:
        image.setdefault("frame_index", 0)
    boxed = {(image["sop_instance_uid"], image["frame_index"]) for image in report["images"]
             for answer in image["answers"] if parse_boxes(answer["answer"])[0]}
    results = write_results(report, tmp_path / "out", write_pdf=True).files
    captures = [pydicom.dcmread(r.path) for r in results if r.path.name.startswith("SC_")]
    assert boxed and {(sc.SourceImageSequence[0].ReferencedSOPInstanceUID,
                       int(sc.SourceImageSequence[0].get("ReferencedFrameNumber", 1)) - 1) for sc in captures} == boxed
    assert len(captures) == len(boxed)
    for result in results:
        if result.path.suffix == ".dcm":
            assert dciodvfy_errors(result.path) == [], result.path.name
    assert [r.sop_instance_uid for r in results if r.path.suffix == ".json"] == [None]

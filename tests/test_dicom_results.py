"""DICOM results: findings parsed from answers, the Comprehensive SR, the Secondary Capture and the PDF.

References: the synthetic study's ground truth and the synth module's own answer writers (the same
text the demo model is trained to produce), pydicom/highdicom reading the written files back, PIL-free
pixel checks against pydicom's decode of the source, and dciodvfy (dicom3tools) when installed.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from fundusrt.dicom.capture import BOX_COLOURS, line_width, write_capture, write_encapsulated_pdf
from fundusrt.dicom.findings import LesionBox, parse_amd, parse_boxes, parse_dr_grade, study_findings
from fundusrt.dicom.sr import DECISION_CODES, ResultWriteError, write_sr
from fundusrt.runtime.protocol import DEFAULT_PROTOCOL, item_result, load_protocol, screen_eye, screening_summary
from fundusrt.synth import GroundTruth, write_study
from fundusrt.synth.grading import DR_GRADE_NAMES, LESION_KINDS
from fundusrt.synth.instructions import (
    GRADE_LETTERS,
    QUESTIONS,
    expected_answer,
    grounding_answer,
    grounding_qa,
    normalise_box,
    structured_report,
)

PROTOCOL = load_protocol(DEFAULT_PROTOCOL)
# the probability a perfect model puts on the true answer in these reports (the rest is spread evenly)
TRUE_P = 0.9

PACKAGE = {"name": "tiny-test", "family": "internvit-shuffle", "precision": "fp32",
           "manifest_sha256": "0123456789abcdef" * 4, "backend": "ort-cpu", "fundusrt_version": "0.1.0"}


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines of dciodvfy for `path` (the test skips when dicom3tools is absent)."""
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy not installed (Debian package dicom3tools)")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def truth_of(entry: dict[str, Any]) -> GroundTruth:
    return GroundTruth.from_dict({k: v for k, v in entry.items() if k in GroundTruth.__dataclass_fields__})


def truth_items(truth: GroundTruth) -> dict[str, Any]:
    """The default protocol's items as a perfect model scores them: TRUE_P on the true answer."""
    items = {}
    for item in PROTOCOL.items:
        right = expected_answer(item.id, truth)
        rest = (1 - TRUE_P) / (len(item.answers) - 1)
        items[item.id] = item_result(item, {a: TRUE_P if a == right else rest for a in item.answers})
    return items


def report_from_truth(study: Any) -> dict[str, Any]:
    """A report whose answers are what a perfect model would say (the synth answer writers), screened
    with the default protocol as `Pipeline.run_study` screens."""
    images = []
    for sop_uid, entry in study.instances.items():
        truth = truth_of(entry)
        answers = [{"question": QUESTIONS["report"], "answer": structured_report(truth)}]
        for kind in sorted({les.kind for les in truth.lesions}):
            qa = grounding_qa(truth, kind)
            answers.append({"question": qa.question, "answer": qa.answer})
        qa = grounding_qa(truth, "optic disc")
        answers.append({"question": qa.question, "answer": qa.answer})
        images.append({"sop_instance_uid": sop_uid, "series_instance_uid": entry["series_instance_uid"],
                       "laterality": entry["laterality"], "source": str(study.out_dir / entry["file"]),
                       "num_tiles": 1, "answers": answers, "gradable": True, "items": truth_items(truth)})
    by_eye: dict[str, list] = {}
    for image in images:
        by_eye.setdefault(image["laterality"], []).append(image)
    eyes = {eye: {"images": [i["sop_instance_uid"] for i in entries], **screen_eye(PROTOCOL, entries)}
            for eye, entries in by_eye.items()}
    return {"study_instance_uid": study.study_instance_uid, "package": PACKAGE, "images": images, "errors": [],
            "eyes": eyes, "screening": screening_summary(PROTOCOL, [e["decision"] for e in eyes.values()])}


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Seed 5 gives lesions in both eyes at this size; uncompressed so pixels compare exactly.
    return write_study(tmp_path_factory.mktemp("study"), seed=5, variants=("op", "op-stereo"),
                       transfer_syntaxes=("explicit-le",), size=(384, 288))


# ---------------------------------------------------------------- findings from text

def test_parse_boxes_matches_the_grounding_writer() -> None:
    boxes = [normalise_box((10, 20, 110, 60), 400, 300), normalise_box((200, 100, 260, 290), 400, 300)]
    text = "Found: " + grounding_answer("hard exudate", boxes) + " and " + grounding_answer("drusen", boxes[:1])
    assert parse_boxes(text) == ([("hard exudate", boxes[0]), ("hard exudate", boxes[1]), ("drusen", boxes[0])], [])


def test_parse_boxes_keeps_the_valid_boxes_and_says_why_others_were_dropped() -> None:
    found, dropped = parse_boxes("<ref>x</ref><box>[[0,0,1000,5],[10,10,20,20]]</box> "
                                 "<ref>y</ref><box>[[50,0,40,5]]</box>")
    assert found == [("x", (10, 10, 20, 20))]
    assert len(dropped) == 2 and "above 999" in dropped[0] and "inverted" in dropped[1]


def test_box_to_pixels_is_the_inverse_of_normalisation() -> None:
    width, height = 4288, 2848
    pixel_box = (1000, 700, 1300, 900)
    lesion = LesionBox("haemorrhage", "haemorrhage", normalise_box(pixel_box, width, height), "1.2.3")
    x1, y1, x2, y2 = lesion.to_pixels(height, width)
    # One bin of the 0-999 grid is size/1000 pixels.
    assert abs(x1 - pixel_box[0]) <= width / 1000 and abs(y1 - pixel_box[1]) <= height / 1000
    assert abs(x2 - (pixel_box[2] - 1)) <= width / 1000 and abs(y2 - (pixel_box[3] - 1)) <= height / 1000


@pytest.mark.parametrize("grade", range(5))
def test_dr_grade_from_report_text(grade: int) -> None:
    assert parse_dr_grade(f"Impression: {DR_GRADE_NAMES[grade]}.") == grade
    assert parse_dr_grade(f"The eye shows grade {grade} retinopathy.") == grade


def test_closed_answers_in_text_are_not_read_back() -> None:
    # coded results come from the protocol's scored items only: an answer text is never parsed into a code
    report = {"images": [{"sop_instance_uid": "1.2", "laterality": "L", "answers": [
        {"question": QUESTIONS["dr_grade"], "answer": "C"}]}]}
    eye = study_findings(report)[0]
    assert (eye.items, eye.decision) == ([], None)


def test_text_rules_do_not_overread() -> None:
    assert parse_dr_grade("Moderate non-proliferative diabetic retinopathy.") == 2
    assert parse_dr_grade("Severe nonproliferative DR; no neovascularisation.") == 3
    assert parse_dr_grade("Moderate cup-to-disc ratio.") is None  # severity words need a DR context
    assert parse_dr_grade("No diabetic retinopathy. Mild drusen.") == 0
    assert parse_amd("Impression: no DR; AMD.") is True
    assert parse_amd("No signs of age-related macular degeneration.") is False
    assert parse_amd("Impression: no DR.") is None


# ---------------------------------------------------------------- SR

def _content_items(ds: Any) -> list[Any]:
    items, stack = [], list(ds.ContentSequence)
    while stack:
        item = stack.pop()
        items.append(item)
        stack.extend(item.get("ContentSequence", []))
    return items


def test_sr_codes_findings_and_references_every_source(study: Any, tmp_path: Path) -> None:
    report = report_from_truth(study)
    sources = {p: p.read_bytes() for p in study.files}
    path = write_sr(report, tmp_path / "sr.dcm")
    assert {p: p.read_bytes() for p in study.files} == sources  # sources untouched
    sr = pydicom.dcmread(path)
    first = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate"):
        assert sr.get(keyword) == first.get(keyword), keyword
    source_uids = set(study.instances)
    source_series = {e["series_instance_uid"] for e in study.instances.values()}
    assert sr.SOPInstanceUID not in source_uids and sr.SeriesInstanceUID not in source_series
    evidence = {ref.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence}
    assert evidence == source_uids

    items = _content_items(sr)
    coded = [(i.ConceptNameCodeSequence[0].CodeValue, i.ConceptCodeSequence[0].CodeValue)
             for i in items if i.ValueType == "CODE"]
    eyes = {}
    for sop_uid, entry in study.instances.items():
        eyes.setdefault(entry["laterality"], []).append(truth_of(entry))
    grade_codes = [o.code.value for o in PROTOCOL.item("dr_grade").options]
    for laterality, truths in eyes.items():
        assert ("4855003", grade_codes[max(t.dr_grade for t in truths)]) in coded  # worst image wins
        assert ("272741003", {"R": "24028007", "L": "7771000"}[laterality]) in coded  # Laterality
        decision = "refer" if any(t.referable_dr for t in truths) else "no_refer"
        assert ("screen-decision", DECISION_CODES[decision][0]) in coded
    # each item's answer probability is a NUM beside its code
    probabilities = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                     if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == "probability"]
    assert probabilities == [TRUE_P] * len(PROTOCOL.items) * len(eyes)
    texts = [i.TextValue for i in items if i.ValueType == "TEXT"]
    assert any("Impression" in t for t in texts)
    algorithm = {i.ConceptNameCodeSequence[0].CodeMeaning: i.TextValue for i in items if i.ValueType == "TEXT"}
    assert algorithm["Algorithm Name"] == PACKAGE["name"]
    params = [i.TextValue for i in items if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert f"manifest_sha256={PACKAGE['manifest_sha256']}" in params and "precision=fp32" in params

    # Every grounded box is a closed POLYLINE on its image, at box * size / 1000.
    polylines = [(i.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
                  np.asarray(i.GraphicData, dtype=np.float64).reshape(-1, 2))
                 for i in items if i.ValueType == "SCOORD"]
    expected = []
    for image in report["images"]:
        ds = pydicom.dcmread(image["source"], stop_before_pixels=True)
        for answer in image["answers"]:
            for _, (x1, y1, x2, y2) in parse_boxes(answer["answer"])[0]:
                sx, sy = ds.Columns / 1000, ds.Rows / 1000
                expected.append((image["sop_instance_uid"], np.array(
                    [[x1 * sx, y1 * sy], [x2 * sx, y1 * sy], [x2 * sx, y2 * sy], [x1 * sx, y2 * sy], [x1 * sx, y1 * sy]])))
    assert expected and len(polylines) == len(expected)
    for uid, points in expected:
        assert any(u == uid and np.allclose(p, points, atol=1e-3) for u, p in polylines), (uid, points)
    assert dciodvfy_errors(path) == []


def test_sr_refuses_to_overwrite_a_source(study: Any) -> None:
    target = study.files[0]
    before = target.read_bytes()
    with pytest.raises(ResultWriteError, match="already exists"):
        write_sr(report_from_truth(study), target)
    assert target.read_bytes() == before


def test_sr_refuses_a_replaced_source(study: Any, tmp_path: Path) -> None:
    report = report_from_truth(study)
    report["images"][0]["source"] = report["images"][1]["source"]
    with pytest.raises(ResultWriteError, match="holds SOPInstanceUID"):
        write_sr(report, tmp_path / "sr.dcm")


# ---------------------------------------------------------------- Secondary Capture

def test_capture_draws_boxes_and_keeps_the_rest(study: Any, tmp_path: Path) -> None:
    report = report_from_truth(study)
    eyes = study_findings(report)
    lesions = next(les for eye in eyes for les in [eye.lesions] if les)
    sop_uid = lesions[0].sop_instance_uid
    on_image = [les for les in lesions if les.sop_instance_uid == sop_uid and les.frame_index == 0]
    source = next(Path(i["source"]) for i in report["images"] if i["sop_instance_uid"] == sop_uid)
    path = write_capture(source, on_image, tmp_path / "sc.dcm")
    sc, src = pydicom.dcmread(path), pydicom.dcmread(source)
    original = src.pixel_array if int(src.get("NumberOfFrames", 1)) == 1 else src.pixel_array[0]
    drawn = sc.pixel_array
    assert drawn.shape == original.shape and sc.PhotometricInterpretation == "RGB"
    assert sc.PatientID == src.PatientID and sc.StudyInstanceUID == src.StudyInstanceUID
    assert sc.SOPInstanceUID != src.SOPInstanceUID and sc.SeriesInstanceUID != src.SeriesInstanceUID
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sop_uid and sc.BurnedInAnnotation == "YES"
    rows, cols = original.shape[:2]
    changed = np.zeros((rows, cols), dtype=bool)
    for les in on_image:
        x1, y1, x2, y2 = (round(v) for v in les.to_pixels(rows, cols))
        colour = BOX_COLOURS[les.kind]
        # The left edge of each box (below any label) carries the kind's colour.
        mid = (y1 + y2) // 2
        assert tuple(drawn[mid, x1]) == colour, (les, tuple(drawn[mid, x1]))
        w = line_width(rows, cols)
        changed[max(0, y1 - 4 * w - cols // 30):y2 + w + 1, max(0, x1 - w):cols] = True  # box + label band
    assert np.array_equal(drawn[~changed], original[~changed])
    assert dciodvfy_errors(path) == []


# ---------------------------------------------------------------- PDF

def pdf_of(path: Path) -> bytes:
    ds = pydicom.dcmread(path)
    return bytes(ds.EncapsulatedDocument)[:ds.EncapsulatedDocumentLength]


def test_encapsulated_pdf_report(study: Any, tmp_path: Path) -> None:
    pypdf = pytest.importorskip("pypdf")
    report = report_from_truth(study)
    report["images"][0]["answers"][0]["answer"] += " Note: œdema, café."  # outside Latin-1: printed as '?'
    eyes = study_findings(report)
    path = write_encapsulated_pdf(report, tmp_path / "pdf.dcm")
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    first = pydicom.dcmread(study.files[0], stop_before_pixels=True)
    assert ds.PatientName == first.PatientName and ds.StudyInstanceUID == first.StudyInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in ds.SourceInstanceSequence} == set(study.instances)
    reader = pypdf.PdfReader(io.BytesIO(pdf_of(path)))
    assert len(reader.pages) == 1, "the report is one page"
    text = " ".join(reader.pages[0].extract_text().split())
    decision = {"refer": "REFER", "no_refer": "NO REFERRAL", "ungradable": "UNGRADABLE"}
    assert f"Patient: {decision[report['screening']['decision']]}" in text
    assert str(first.PatientID) in text and PACKAGE["manifest_sha256"] in text and PROTOCOL.sha256 in text
    for eye in eyes:
        assert {"R": "Right eye (OD)", "L": "Left eye (OS)"}[eye.laterality] in text
        for item in eye.items:  # every item with its answer's meaning and probability
            assert f"{item.concept[2]}: {item.code[2]} p {TRUE_P:.2f}" in text, item
    assert "caf" in text and "Generated by a machine-learning model" in text
    assert dciodvfy_errors(path) == []


def test_pdf_report_renders_with_pictures(study: Any, tmp_path: Path) -> None:
    from fundusrt.dicom.pdf_report import DECISION_COLOURS

    tool = shutil.which("pdftoppm")
    if tool is None:
        pytest.skip("pdftoppm not installed (Debian package poppler-utils)")
    report = report_from_truth(study)
    (tmp_path / "report.pdf").write_bytes(pdf_of(write_encapsulated_pdf(report, tmp_path / "pdf.dcm")))
    subprocess.run([tool, "-png", "-r", "40", "-singlefile", str(tmp_path / "report.pdf"), str(tmp_path / "page")],
                   check=True, timeout=60)
    page = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)
    assert float((page.min(axis=-1) < 200).mean()) > 0.05, "the rendered page is (almost) blank"
    # the banner in the decision's colour, and fundus pictures (red-dominant pixels) for the two eyes
    banner = np.array(DECISION_COLOURS[report["screening"]["decision"]])
    assert (np.abs(page - banner).max(axis=-1) < 30).sum() > 500
    red = (page[..., 0] > 60) & (page[..., 0] > page[..., 1] + 30) & (page[..., 0] > page[..., 2] + 30)
    assert red.sum() > 2000


def test_findings_match_ground_truth(study: Any) -> None:
    eyes = {eye.laterality: eye for eye in study_findings(report_from_truth(study))}
    for sop_uid, entry in study.instances.items():
        truth = truth_of(entry)
        eye = eyes[entry["laterality"]]
        assert sop_uid in eye.images
        grade = next(item for item in eye.items if item.item_id == "dr_grade")
        assert GRADE_LETTERS.index(grade.answer) >= truth.dr_grade and grade.concept[0] == "4855003"
        kinds = {les.kind for les in eye.lesions if les.sop_instance_uid == sop_uid}
        assert kinds == {les.kind for les in truth.lesions} | {"optic_disc"}
        assert kinds - {"optic_disc"} <= set(LESION_KINDS)

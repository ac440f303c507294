"""Study reports: what the runtime found for each image and each eye, as JSON and as plain text."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fundusrt.manifest import atomic_write_text

EYE_NAMES = {"R": "Right eye (OD)", "L": "Left eye (OS)"}
# the JSON report's schema version (fundusrt/runtime/protocols/README.md); 1 added screening to the earlier keys
REPORT_FORMAT = "fundusrt-report/1"
UNKNOWN_EYE = "unknown"


@dataclass
class QuestionAnswer:
    """One question asked about one image and the generated answer."""

    question: str
    answer: str
    num_tokens: int
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageResult:
    """The answers for one fundus image."""

    sop_instance_uid: str
    series_instance_uid: str
    frame_index: int  # frames of one multi-frame file (a stereo pair) share the SOP Instance UID
    laterality: str | None
    source: str
    num_tiles: int
    answers: list[QuestionAnswer]
    timings: dict[str, float] = field(default_factory=dict)
    # laterality is the value used; these say where it came from and what the picture shows
    # "tag"; "image" (no tag: derived from the picture); "model" (no tag and no confident picture reading:
    # the protocol's laterality item, at P >= protocol.MODEL_LATERALITY_MIN_PROBABILITY)
    laterality_source: str = "tag"
    image_laterality: str = "unknown"  # "R", "L" or "unknown"
    image_laterality_confidence: float = 0.0
    laterality_mismatch: bool = False
    model_laterality_probability: float | None = None  # P(the eye used) when laterality_source is "model"
    # the pixel checks of fundusrt.dicom.gradability; an ungradable image is not shown to the model
    gradable: bool = True
    gradability_reasons: list[str] = field(default_factory=list)
    # protocol items scored on this image: {ITEM_ID: {"answer", "code", "probabilities": {OPTION: p}}}
    items: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class FileError:
    """A file (or image) that could not be used, and why."""

    file: str
    status: str
    reason: str


@dataclass
class StudyReport:
    """Everything `Pipeline.run_study` produced for one study.

    `eyes` is derived from `images`: per laterality ("R", "L", and "unknown" when an image has none),
    the answers of that eye's images assembled into a short text, plus the eye's screening result.
    `screening` is the patient-level result: {"protocol": {name, version, sha256}, "decision",
    "threshold", ...} (fundusrt.runtime.protocol.screening_summary).
    """

    study_instance_uid: str | None
    package: dict[str, Any]
    images: list[ImageResult]
    errors: list[FileError]
    timings: dict[str, float] = field(default_factory=dict)
    screening: dict[str, Any] = field(default_factory=dict)
    # per eye: {"decision", "gradable", "items", "referral_probability"} (fundusrt.runtime.protocol.screen_eye)
    eye_screening: dict[str, dict[str, Any]] = field(default_factory=dict)

    def eyes(self) -> dict[str, dict[str, Any]]:
        """Per-eye reports: {laterality: {"images": [sop uids], "report": text, "gradable", "gradability_reasons",
        and the screening keys "decision", "items", "referral_probability"}}, in R, L, unknown order."""
        grouped: dict[str, list[ImageResult]] = {}
        for image in self.images:
            grouped.setdefault(image.laterality or UNKNOWN_EYE, []).append(image)
        return {
            eye: {"images": [i.sop_instance_uid for i in grouped[eye]], "report": _eye_text(grouped[eye]),
                  # an eye with no gradable image is ungradable (retake), never a normal eye
                  "gradable": any(i.gradable for i in grouped[eye]),
                  "gradability_reasons": [f"image {i.sop_instance_uid}: {r}" for i in grouped[eye]
                                          for r in i.gradability_reasons],
                  **self.eye_screening.get(eye, {})}
            for eye in ("R", "L", UNKNOWN_EYE) if eye in grouped
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see `write_json`)."""
        return {
            "format": REPORT_FORMAT,
            "study_instance_uid": self.study_instance_uid,
            "package": self.package,
            "screening": self.screening,
            "images": [asdict(i) for i in self.images],
            "eyes": self.eyes(),
            "errors": [asdict(e) for e in self.errors],
            "timings": self.timings,
        }

    def write_json(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        return path

    def render_text(self) -> str:
        """A plain-text rendering: per-eye reports, then files that could not be used."""
        lines = [f"Study {self.study_instance_uid or '(no StudyInstanceUID)'} - model {self.package.get('name', '?')}"]
        if self.screening:
            protocol = self.screening["protocol"]
            lines.append(f"Screening decision: {_decision_text(self.screening['decision'])} (protocol "
                         f"{protocol['name']} {protocol['version']}, referral threshold "
                         f"{self.screening['threshold']:.2f})")
        for eye, report in self.eyes().items():
            title = EYE_NAMES.get(eye, "Eye not recorded")
            lines += ["", f"{title}: {len(report['images'])} image(s)"]
            if "decision" in report:
                p_refer = report["referral_probability"]
                lines.append(f"  Decision: {_decision_text(report['decision'])}"
                             + (f" (P = {p_refer:.2f})" if p_refer is not None else ""))
                lines += [f"  {item_id}: {item['answer']} ({item['probabilities'][item['answer']]:.2f})"
                          for item_id, item in report["items"].items()]
            lines += [report["report"]] if report["report"] else []
        lines += [line for image in self.images for line in _laterality_notes(image)]
        if self.errors:
            lines += ["", f"Not used ({len(self.errors)}):"]
            lines += [f"  {e.file}: {e.status}: {e.reason}" for e in self.errors]
        if "total_ms" in self.timings:
            lines += ["", f"Total {self.timings['total_ms'] / 1000:.1f} s"]
        return "\n".join(lines) + "\n"


def _decision_text(decision: str) -> str:
    return {"refer": "REFER", "no_refer": "no referral (rescreen)",
            "ungradable": "UNGRADABLE (retake the photograph)"}.get(decision, decision)


def _laterality_notes(image: ImageResult) -> list[str]:
    """Warning and note lines about an image's laterality (mismatch with the tag, derived from the picture or
    read by the model)."""
    notes = []
    if image.laterality_mismatch:
        notes.append(f"WARNING: image {image.sop_instance_uid} is tagged {image.laterality} but the picture shows "
                     f"{image.image_laterality} (confidence {image.image_laterality_confidence:.2f}): check the eye")
    elif image.laterality_source == "image" and image.laterality:
        notes.append(f"Note: image {image.sop_instance_uid} has no laterality tag; {image.laterality} was read from "
                     f"the picture (confidence {image.image_laterality_confidence:.2f})")
    elif image.laterality_source == "model" and image.model_laterality_probability is not None:
        notes.append(f"Note: image {image.sop_instance_uid} has no laterality tag and the picture check could not "
                     f"tell the eye; {image.laterality} was read by the model "
                     f"(probability {image.model_laterality_probability:.3f})")
    return ["", *notes] if notes else []


def _eye_text(images: list[ImageResult]) -> str:
    lines = []
    for n, image in enumerate(images, 1):
        prefix = f"  [image {n}] " if len(images) > 1 else "  "
        if not image.gradable:
            lines.append(f"{prefix}UNGRADABLE: {'; '.join(image.gradability_reasons)}")
        for qa in image.answers:
            lines.append(f"{prefix}{qa.question} {qa.answer.strip() or '(no answer)'}")
    return "\n".join(lines)

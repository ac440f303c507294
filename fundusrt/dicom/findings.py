"""Structured findings per eye from a study report: the protocol's coded items, the decision, lesion boxes.

The coded results come from the screening protocol's scored items (`fundusrt.runtime.protocol`): each
eye's answer, its code and its probability, as the report carries them; nothing is read back from
generated text. Free text still carries two things: grounded lesion boxes (below), and, for
evaluating free-text reports (`fundusrt.bench.clinical`), `parse_dr_grade` and `parse_amd`.

Free-text rules (case-insensitive; the worst grade found wins):

- an explicit ``grade N`` (N in 0-4) gives N;
- otherwise "proliferative" (not preceded by "non"/"non-") gives 4, "severe" 3, "moderate" 2,
  "mild" 1, each only when the sentence mentions retinopathy, DR or NPDR;
- "no diabetic retinopathy", "no DR", "no signs of diabetic retinopathy" and "no apparent
  retinopathy" give 0.
- AMD: "no AMD" / "no (signs of) age-related macular degeneration" gives False; otherwise a
  mention of AMD or age-related macular degeneration gives True; no mention gives None.

Grounded lesions are written by the model as ``<ref>label</ref><box>[[x1,y1,x2,y2]]</box>`` with
coordinates normalised to 0-999 (InternVL / Qwen-VL convention: pixel = value * size / 1000);
several boxes may follow one label: ``<box>[[..],[..]]</box>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

GROUNDING_SCALE = 1000  # box coordinates are bins of size/1000, 0..999

_REF_BOX = re.compile(r"<ref>(?P<label>.*?)</ref>\s*<box>(?P<boxes>.*?)</box>", re.S | re.I)
_BOX = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")
_GRADE = re.compile(r"\bgrade\s*[:=]?\s*([0-4])\b", re.I)
_NO_DR = re.compile(r"\bno\s+(?:signs?\s+of\s+|apparent\s+|evidence\s+of\s+)?(?:diabetic\s+retinopathy|dr|retinopathy)\b",
                    re.I)
_DR_CONTEXT = re.compile(r"retinopathy|\bn?pdr\b|\bdr\b", re.I)
_SEVERITY = (  # checked from the worst down
    (4, re.compile(r"(?<!non)(?<!non-)(?<!non )\bproliferative\b|\bpdr\b", re.I)),
    (3, re.compile(r"\bsevere\b", re.I)),
    (2, re.compile(r"\bmoderate\b", re.I)),
    (1, re.compile(r"\bmild\b", re.I)),
)
_NO_AMD = re.compile(r"\bno\s+(?:signs?\s+of\s+|evidence\s+of\s+)?(?:amd|age[- ]related\s+macular\s+degeneration)\b",
                     re.I)
_AMD = re.compile(r"\bamd\b|age[- ]related\s+macular\s+degeneration", re.I)

# label words -> region kind: the lesion kinds of fundusrt.synth.grading.LESION_KINDS, and the disc
_LESION_WORDS = (
    ("optic disc", "optic_disc"),
    ("microaneurysm", "microaneurysm"),
    ("haemorrhage", "haemorrhage"),
    ("hemorrhage", "haemorrhage"),
    ("cotton", "cotton_wool_spot"),
    ("exudate", "hard_exudate"),
    ("drusen", "drusen"),
    ("neovascular", "neovascularisation"),
)


class FindingsError(ValueError):
    """A report or a grounding box cannot be turned into findings."""


@dataclass(frozen=True)
class LesionBox:
    """A grounded region: the model's label, the kind it names (lesion kind, "optic_disc", None), the box.

    Attributes:
        box: (x1, y1, x2, y2) normalised to 0-999 as the model wrote it.
        sop_instance_uid: the image the box was drawn on.
        frame_index: 0-based frame of that image.
    """

    label: str
    kind: str | None
    box: tuple[int, int, int, int]
    sop_instance_uid: str
    frame_index: int = 0

    def to_pixels(self, rows: int, columns: int) -> tuple[float, float, float, float]:
        """The box in pixel coordinates (x1, y1, x2, y2) of an image of `rows` x `columns`."""
        x1, y1, x2, y2 = self.box
        sx, sy = columns / GROUNDING_SCALE, rows / GROUNDING_SCALE
        return (x1 * sx, y1 * sy, x2 * sx, y2 * sy)


# (code value, scheme designator, meaning)
CodeTuple = tuple[str, str, str]


@dataclass(frozen=True)
class CodedItem:
    """One protocol item's result for an eye: concept -> answer code, with the probability of every option."""

    item_id: str
    concept: CodeTuple
    answer: str
    code: CodeTuple
    probabilities: dict[str, float]

    @property
    def probability(self) -> float:
        """The probability of the reported answer."""
        return self.probabilities[self.answer]


@dataclass
class EyeFindings:
    """What was found in one eye ("R", "L", or None when the images do not say).

    `decision` is the eye's screening decision ("refer", "no_refer", "ungradable"; None when the report
    has no screening); `dropped` says which grounding boxes of the answers could not be kept, and why.
    """

    laterality: str | None
    images: list[str]
    decision: str | None = None
    gradable: bool = True
    gradability_reasons: list[str] = field(default_factory=list)
    items: list[CodedItem] = field(default_factory=list)
    lesions: list[LesionBox] = field(default_factory=list)
    text: str = ""
    dropped: list[str] = field(default_factory=list)


def lesion_kind(label: str) -> str | None:
    """The region kind a grounding label names (a lesion kind or "optic_disc"), None when unknown."""
    lowered = label.lower()
    return next((kind for word, kind in _LESION_WORDS if word in lowered), None)


def parse_boxes(text: str) -> tuple[list[tuple[str, tuple[int, int, int, int]]], list[str]]:
    """Every valid (label, (x1, y1, x2, y2)) grounded in `text`, in order, and why the others were dropped.

    A model can write a box no one can draw (a coordinate above 999, x2 < x1 or y2 < y1): that box is
    dropped with a reason, and the valid ones are kept, so one bad box never costs the study its results.
    """
    found, dropped = [], []
    for match in _REF_BOX.finditer(text):
        label = match.group("label").strip()
        for box_match in _BOX.finditer(match.group("boxes")):
            x1, y1, x2, y2 = (int(v) for v in box_match.groups())
            if max(x1, y1, x2, y2) >= GROUNDING_SCALE:
                dropped.append(f"box {box_match.group(0)} for {label!r} has a coordinate above "
                               f"{GROUNDING_SCALE - 1}; grounding boxes are normalised to 0-{GROUNDING_SCALE - 1}")
            elif x2 < x1 or y2 < y1:
                dropped.append(f"box {box_match.group(0)} for {label!r} is inverted (need x1 <= x2, y1 <= y2)")
            else:
                found.append((label, (x1, y1, x2, y2)))
    return found, dropped


def strip_grounding(text: str) -> str:
    """`text` with grounding markup replaced by its label, for humans."""
    return re.sub(r"\s+", " ", _REF_BOX.sub(lambda m: m.group("label").strip(), text)).strip()


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?;\n])\s*", text) if s.strip()]


def parse_dr_grade(text: str) -> int | None:
    """The worst DR grade (0-4) stated in `text`, or None when it states none (rules: module docstring)."""
    text = strip_grounding(text)
    grades = [int(m.group(1)) for m in _GRADE.finditer(text)]
    for sentence in _sentences(text):
        if _NO_DR.search(sentence):
            grades.append(0)
        if not _DR_CONTEXT.search(sentence):
            continue
        grade = next((g for g, pattern in _SEVERITY if pattern.search(sentence)), None)
        if grade is not None:
            grades.append(grade)
    return max(grades) if grades else None


def parse_amd(text: str) -> bool | None:
    """True / False when `text` states AMD or its absence, None when it does not mention it."""
    text = strip_grounding(text)
    if _AMD.search(_NO_AMD.sub("", text)):
        return True
    return False if _NO_AMD.search(text) else None


def _code(value: Mapping[str, str]) -> CodeTuple:
    return (value["value"], value["scheme"], value["meaning"])


def coded_items(items: Mapping[str, Mapping[str, Any]]) -> list[CodedItem]:
    """The report's items of one eye ({ITEM_ID: {"answer", "code", "concept", "probabilities"}}) as CodedItems."""
    return [CodedItem(item_id, _code(item["concept"]), item["answer"], _code(item["code"]),
                      {k: float(v) for k, v in item["probabilities"].items()})
            for item_id, item in items.items()]


def study_findings(report: Any) -> list[EyeFindings]:
    """Findings per eye (R, L, then eyes not recorded) from a StudyReport or its JSON form (`to_dict()`).

    Raises:
        FindingsError: the report has no images list.
    """
    data = report.to_dict() if hasattr(report, "to_dict") else report
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
        raise FindingsError("expected a StudyReport or its JSON form with an 'images' list")
    grouped: dict[str | None, list[Mapping[str, Any]]] = {}
    for image in data["images"]:
        grouped.setdefault(image.get("laterality"), []).append(image)
    eyes = []
    for laterality in sorted(grouped, key=lambda e: {"R": 0, "L": 1}.get(e or "", 2)):
        images = grouped[laterality]
        answers = [(image, a.get("question", ""), a.get("answer", "")) for image in images
                   for a in image.get("answers", [])]
        # the report files images without laterality under "unknown" (fundusrt.runtime.report.UNKNOWN_EYE)
        screened = (data.get("eyes") or {}).get(laterality or "unknown", {})
        lesions, dropped = [], []
        for image, _, text in answers:
            boxes, problems = parse_boxes(text)
            lesions += [LesionBox(label, lesion_kind(label), box, image["sop_instance_uid"],
                                  int(image.get("frame_index", 0))) for label, box in boxes]
            dropped += [f"image {image['sop_instance_uid']}: {problem}" for problem in problems]
        eyes.append(EyeFindings(
            laterality=laterality,
            images=list(dict.fromkeys(image["sop_instance_uid"] for image in images)),
            decision=screened.get("decision"),
            gradable=bool(screened.get("gradable", any(image.get("gradable", True) for image in images))),
            gradability_reasons=list(screened.get("gradability_reasons", [])),
            items=coded_items(screened.get("items", {})),
            lesions=lesions,
            dropped=dropped,
            text="\n".join(f"{a.get('question', '').strip()} {strip_grounding(a.get('answer', ''))}".strip()
                           for image in images for a in image.get("answers", [])),
        ))
    return eyes

"""Synthetic instruction data: fundus images with question/answer conversations from their ground truth.

Question types (QUESTION_TYPES):

- closed questions with one-word answers: ``laterality`` (Right/Left), ``referable_dr`` (Yes/No),
  ``dr_grade`` (letter A-E), ``amd`` (drusen of AMD, Yes/No), ``cdr_large`` (cup-to-disc ratio
  >= 0.65, Yes/No);
- ``grounding``: InternVL grounding, ``<ref>label</ref><box>[[x1,y1,x2,y2], ...]</box>`` with
  coordinates normalised to 0-999 of the image width/height;
- ``report``: a short structured report (Examination / Findings / Impression).

`write_instructions` renders cases by seed and writes PNG images plus a LLaVA JSON file (or
InternVL JSONL) whose records also carry the question types and the ground truth under
``"fundusrt"`` so that evaluation can score answers per type.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.manifest import atomic_write_bytes, atomic_write_text
from fundusrt.synth.grading import DR_GRADE_NAMES, LESION_KINDS, GroundTruth, Lesion

QUESTION_TYPES = ("laterality", "referable_dr", "dr_grade", "amd", "cdr_large", "gradable", "grounding", "report")
CLOSED_TYPES = ("laterality", "referable_dr", "dr_grade", "amd", "cdr_large", "gradable")
GRADE_LETTERS = "ABCDE"
QUESTIONS = {
    "laterality": "Which eye is this?",
    "referable_dr": "Is there referable diabetic retinopathy?",
    "dr_grade": "What is the DR grade (A none, B mild, C moderate, D severe, E proliferative)?",
    "amd": "Are there drusen of age-related macular degeneration?",
    "cdr_large": "Is the cup-to-disc ratio large?",
    "gradable": "Is this photograph of gradable quality?",
    "report": "Describe the findings in this fundus photograph.",
}
# Grounding asks for one target at a time; the optic disc is always present, lesions may not be.
GROUNDING_TARGETS = ("optic disc",) + LESION_KINDS
LESION_WORDS = {
    "microaneurysm": "microaneurysms",
    "haemorrhage": "haemorrhages",
    "hard_exudate": "hard exudates",
    "cotton_wool_spot": "cotton wool spots",
    "drusen": "drusen",
    "neovascularisation": "neovascularisation",
}
MAX_BOXES = 8
NONE_FOUND = "None."
# Small camera-like frames: drawing cost barely depends on size, and the model sees tiles anyway.
SMALL_SIZES = ((384, 384), (432, 288), (480, 320), (512, 512), (384, 256), (320, 320))


@dataclass(frozen=True)
class QA:
    """One question and its reference answer."""

    type: str
    question: str
    answer: str


def normalise_box(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) -> InternVL 0-999 coordinates (x1/y1 exclusive pixels map inclusive)."""
    x0, y0, x1, y1 = box

    def scale(v: float, side: int) -> int:
        return min(999, max(0, int(v * 1000 / side)))

    return scale(x0, width), scale(y0, height), scale(x1 - 1, width), scale(y1 - 1, height)


def grounding_answer(target: str, boxes: Sequence[tuple[int, int, int, int]]) -> str:
    """`<ref>target</ref><box>[[x1,y1,x2,y2], ...]</box>` for normalised boxes, or NONE_FOUND when empty."""
    if not boxes:
        return NONE_FOUND
    inner = ", ".join(f"[{x0},{y0},{x1},{y1}]" for x0, y0, x1, y1 in boxes)
    return f"<ref>{target}</ref><box>[{inner}]</box>"


def grounding_qa(truth: GroundTruth, target: str) -> QA:
    """Grounding of `target` (see GROUNDING_TARGETS): the largest MAX_BOXES boxes, left to right."""
    if target not in GROUNDING_TARGETS:
        raise ValueError(f"unknown grounding target {target!r}; expected one of {GROUNDING_TARGETS}")
    if target == "optic disc":
        (cx, cy), r = truth.disc_center, truth.disc_radius
        pixel_boxes = [(cx - r, cy - r, cx + r + 1, cy + r + 1)]
        question = "Locate the optic disc."
    else:
        found = sorted((les.box for les in truth.lesions if les.kind == target),
                       key=lambda b: (b[2] - b[0]) * (b[3] - b[1]), reverse=True)[:MAX_BOXES]
        pixel_boxes = sorted(found)
        question = f"Locate the {LESION_WORDS[target]}."
    boxes = [normalise_box(b, truth.width, truth.height) for b in pixel_boxes]
    return QA("grounding", question, grounding_answer(target.replace("_", " "), boxes))


def structured_report(truth: GroundTruth) -> str:
    """Examination / Findings / Impression from the ground truth (categorical, no lesion counts)."""
    eye = "right" if truth.laterality == "R" else "left"
    counts = truth.lesion_counts()
    present = [LESION_WORDS[kind] for kind in LESION_KINDS if counts[kind]]
    findings = ", ".join(present) if present else "no lesions"
    impression = [DR_GRADE_NAMES[truth.dr_grade] + (", referable" if truth.referable_dr else "")]
    if truth.amd:
        impression.append("AMD")
    if truth.glaucoma_suspect:
        impression.append("glaucoma suspect")
    return (f"Examination: colour fundus photograph, {eye} eye.\n"
            f"Findings: {findings}; cup-to-disc ratio {truth.cup_to_disc_ratio:.1f}.\n"
            f"Impression: {'; '.join(impression)}.")


def expected_answer(qtype: str, truth: GroundTruth) -> str:
    """Reference answer of a closed question type or the report."""
    yes_no = {True: "Yes", False: "No"}
    if qtype == "laterality":
        return "Right" if truth.laterality == "R" else "Left"
    if qtype == "referable_dr":
        return yes_no[truth.referable_dr]
    if qtype == "dr_grade":
        return GRADE_LETTERS[truth.dr_grade]
    if qtype == "amd":
        return yes_no[truth.amd]
    if qtype == "cdr_large":
        return yes_no[truth.glaucoma_suspect]
    if qtype == "gradable":
        return yes_no[truth.defect is None]
    if qtype == "report":
        return structured_report(truth)
    raise ValueError(f"no single expected answer for question type {qtype!r}; choose one of {CLOSED_TYPES + ('report',)}")


def parse_closed_answer(qtype: str, text: str) -> str | None:
    """The canonical answer ("Yes", "Left", "C", ...) found at the start of a generated answer, else None."""
    if qtype not in CLOSED_TYPES:
        raise ValueError(f"{qtype!r} is not a closed question type; expected one of {CLOSED_TYPES}")
    word = re.match(r"[A-Za-z]+", text.strip())
    if word is None:
        return None
    first = word.group(0).capitalize()
    choices = {"laterality": ("Right", "Left"), "dr_grade": tuple(GRADE_LETTERS)}.get(qtype, ("Yes", "No"))
    return first if first in choices else None


def check_types(types: Sequence[str]) -> None:
    """Raise ValueError unless `types` is a non-empty list of QUESTION_TYPES."""
    unknown = [t for t in types if t not in QUESTION_TYPES]
    if unknown or not types:
        raise ValueError(f"question types {list(types)} must be a non-empty selection of {QUESTION_TYPES}")


def questions_for(truth: GroundTruth, types: Sequence[str], rng: np.random.Generator) -> list[QA]:
    """One QA per requested type, in a random order (grounding picks a random target)."""
    check_types(types)
    qas = []
    for qtype in types:
        if qtype == "grounding":
            qas.append(grounding_qa(truth, GROUNDING_TARGETS[int(rng.integers(len(GROUNDING_TARGETS)))]))
        else:
            qas.append(QA(qtype, QUESTIONS[qtype], expected_answer(qtype, truth)))
    return [qas[i] for i in rng.permutation(len(qas))]


def conversation_record(record_id: str, image: str, truth: GroundTruth, qas: Sequence[QA]) -> dict[str, Any]:
    """A LLaVA/InternVL record: `<image>` in the first human turn, one turn per QA."""
    turns: list[dict[str, str]] = []
    for i, qa in enumerate(qas):
        turns.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + qa.question})
        turns.append({"from": "gpt", "value": qa.answer})
    return {"id": record_id, "image": image, "width": truth.width, "height": truth.height, "conversations": turns,
            "fundusrt": {"types": [qa.type for qa in qas], "truth": truth.to_dict()}}


def mirror_truth(truth: GroundTruth) -> GroundTruth:
    """The ground truth of the left-right mirrored image: the fellow eye's anatomy, every x reflected."""
    width = truth.width

    def point(p: tuple[float, float]) -> tuple[float, float]:
        return (width - p[0], p[1])

    lesions = [Lesion(les.kind, (width - les.box[2], les.box[1], width - les.box[0], les.box[3]), point(les.center))
               for les in truth.lesions]
    return dataclasses.replace(truth, laterality="L" if truth.laterality == "R" else "R",
                               disc_center=point(truth.disc_center), fovea_center=point(truth.fovea_center),
                               fov_center=point(truth.fov_center), lesions=lesions)


def case_name(seed: int, mirrored: bool = False) -> str:
    """Record id and image stem of a case."""
    return f"synth-{seed:07d}" + ("-m" if mirrored else "")


def records_from_truths(cases: Sequence[tuple[int, bool, GroundTruth]], types: Sequence[str],
                        one_question: bool = False) -> list[dict[str, Any]]:
    """Records of rendered (seed, mirrored, truth) cases: one question per type, in an order seeded by the case.

    With `one_question`, each question becomes a record of its own (`<id>-<k>`, same image), so a model
    cannot answer one question by copying its answer to another from the same conversation. An
    ungradable picture (a defect in its truth) is asked only whether it is gradable: what it shows of
    the retina is not what its truth says is there.
    """
    check_types(types)
    records = []
    for seed, mirrored, truth in cases:
        name = case_name(seed, mirrored)
        asked = types if truth.defect is None else [t for t in types if t == "gradable"]
        if not asked:
            continue
        qas = questions_for(truth, asked, np.random.default_rng([seed, 7, int(mirrored)]))
        if one_question:
            records += [conversation_record(f"{name}-{k}", f"images/{name}.png", truth, [qa])
                        for k, qa in enumerate(qas)]
        else:
            records.append(conversation_record(name, f"images/{name}.png", truth, qas))
    return records


def _render(seed: int, size: tuple[int, int], folder: str, mirror: bool,
            ungradable_rate: float, exposure_gain: tuple[float, float]) -> list[dict[str, Any]]:
    """Draw one case, write its PNG (and the mirrored PNG), return the truth dicts in that order."""
    from PIL import Image

    from fundusrt.synth.fundus import draw_fundus, random_case
    from fundusrt.synth.quality import apply_defect, defect_for

    image, truth = draw_fundus(random_case(seed, size[0], size[1]))
    if exposure_gain != (1.0, 1.0):
        gain = np.random.default_rng([seed, 31]).uniform(*exposure_gain)
        image = np.clip(image.astype(np.float32) * gain, 0, 255).astype(np.uint8)
    views = [(image, truth, False)] + ([(image[:, ::-1], mirror_truth(truth), True)] if mirror else [])
    defect = defect_for(seed, ungradable_rate)
    if defect is not None:  # after mirroring: an eyelid hangs from the top on either eye
        views = [(apply_defect(np.ascontiguousarray(pixels), defect, seed), dataclasses.replace(t, defect=defect), m)
                 for pixels, t, m in views]
    for pixels, _, mirrored in views:
        path = Path(folder) / f"{case_name(seed, mirrored)}.png"
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
    return [view_truth.to_dict() for _, view_truth, _ in views]


def write_instructions(
    out_dir: str | Path,
    *,
    count: int,
    seed_start: int = 0,
    types: Sequence[str] = QUESTION_TYPES,
    sizes: Sequence[tuple[int, int]] = SMALL_SIZES,
    fmt: str = "llava",
    workers: int = 1,
    mirror: bool = False,
    one_question: bool = False,
    ungradable_rate: float = 0.0,
    exposure_gain: tuple[float, float] = (1.0, 1.0),
) -> Path:
    """Render `count` synthetic cases (seeds seed_start...) and write their instruction data.

    Images go to `out_dir/images/<id>.png`; the records to `out_dir/instructions.json` (LLaVA, a JSON
    list) or `out_dir/instructions.jsonl` (InternVL, one record per line), with image paths relative
    to `out_dir`. Each record asks one question of every type in `types`, in a seeded random order.

    Args:
        out_dir: output directory (created).
        count: number of cases.
        seed_start: seed of the first case; held-out sets use a disjoint seed range.
        types: question types, some of QUESTION_TYPES.
        sizes: (width, height) frames, picked per case by seed.
        fmt: "llava" or "internvl".
        workers: rendering processes.
        mirror: also write each image mirrored left-right as the fellow eye (`<id>-m`): twice the
            data for the cost of one drawing, and laterality pairs that differ only in the side.
        one_question: one record per question instead of one conversation per case.
        ungradable_rate: share of cases drawn with a quality defect (`fundusrt.synth.quality`); those
            are asked only the "gradable" question.
        exposure_gain: (low, high): each case's picture is scaled by a gain drawn in this range, so that
            a dim or bright but gradable photograph is not learnt as ungradable.

    Returns:
        the path of the instruction file.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if not 0.0 <= ungradable_rate <= 1.0:
        raise ValueError(f"ungradable_rate must be in [0, 1], got {ungradable_rate}")
    if not 0.0 < exposure_gain[0] <= exposure_gain[1]:
        raise ValueError(f"exposure_gain must be (low, high) with 0 < low <= high, got {exposure_gain}")
    if fmt not in ("llava", "internvl"):
        raise ValueError(f"fmt must be 'llava' or 'internvl', got {fmt!r}")
    check_types(types)
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    seeds = list(range(seed_start, seed_start + count))
    jobs = [(seed, tuple(sizes[seed % len(sizes)]), str(out / "images"), mirror, ungradable_rate, tuple(exposure_gain))
            for seed in seeds]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            views = list(pool.map(_render, *zip(*jobs, strict=True), chunksize=8))
    else:
        views = [_render(*job) for job in jobs]
    cases = [(seed, mirrored, GroundTruth.from_dict(truth)) for seed, truths in zip(seeds, views, strict=True)
             for mirrored, truth in zip((False, True), truths)]
    records = records_from_truths(cases, types, one_question)
    if fmt == "llava":
        path = out / "instructions.json"
        atomic_write_text(path, json.dumps(records, indent=1) + "\n")
    else:
        path = out / "instructions.jsonl"
        atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    return path


"""Synthetic evaluation sets in the public formats, for the demo and for machines without real data.

Every set is a function of its seeds (held out from the training seeds by starting at
EVAL_SEED_START), written atomically, and reused when it already exists.
"""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from fundusrt.manifest import atomic_write_text
from fundusrt.synth.grading import DR_GRADE_NAMES
from fundusrt.synth.study import GROUND_TRUTH_NAME

# Far above the seeds the demo trains on, so the sets are held out.
EVAL_SEED_START = 900_000
IMAGE_SIZE = (384, 288)
MCQ_QUESTION = "What is the diabetic retinopathy grade of this fundus photograph?"


def _png_base64(pixels) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def write_mcq_tsv(path: str | Path, count: int, seed_start: int = EVAL_SEED_START) -> Path:
    """A VLMEvalKit MCQ TSV of `count` DR-grading questions (options A-E = grades 0-4) on synthetic images."""
    from fundusrt.synth.fundus import draw_fundus, random_case

    out = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    letters = "ABCDE"
    writer.writerow(["index", "question", *letters, "answer", "category", "image"])
    for i in range(count):
        pixels, truth = draw_fundus(random_case(seed_start + i, *IMAGE_SIZE))
        writer.writerow([i, MCQ_QUESTION, *DR_GRADE_NAMES, letters[truth.dr_grade], "DR grading",
                         _png_base64(pixels)])
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, buffer.getvalue())
    return out


def write_open_set(out_dir: str | Path, count: int, seed_start: int = EVAL_SEED_START) -> Path:
    """LLaVA JSON of `count` synthetic images, each asked for a report and its DR grade (with references)."""
    from fundusrt.synth.instructions import write_instructions

    return write_instructions(out_dir, count=count, seed_start=seed_start, types=("report", "dr_grade"),
                              sizes=(IMAGE_SIZE,))


def write_study_set(out_dir: str | Path, count: int, seed_start: int = EVAL_SEED_START) -> Path:
    """`count` synthetic DICOM studies (both eyes, with ground truth), one folder each."""
    from fundusrt.synth.study import write_study

    out = Path(out_dir)
    for i in range(count):
        write_study(out / f"study-{i:03d}", seed_start + i, size=IMAGE_SIZE)
    return out


def demo_eval_sets(work_dir: str | Path, count: int) -> list[Path]:
    """The three demo sets (MCQ TSV, LLaVA JSON, DICOM studies) under `work_dir`, written when missing."""
    root = Path(work_dir) / f"evalsets-{count}"
    tsv, open_dir, studies = root / "synthetic_mcq.tsv", root / "synthetic_open", root / "synthetic_studies"
    if not tsv.is_file():
        write_mcq_tsv(tsv, count)
    open_file = open_dir / "instructions.json"
    if not open_file.is_file():
        write_open_set(open_dir, count)
    if len(list(studies.glob(f"*/{GROUND_TRUTH_NAME}"))) < max(1, count // 2):
        write_study_set(studies, max(1, count // 2))
    return [tsv, open_file, studies]

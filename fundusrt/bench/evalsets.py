"""Evaluation sets in the public formats, read into one form the harness runs.

- VLMEvalKit MCQ TSV (GMAI-MMBench, Fundus-MMBench): columns ``index``, ``question``, option
  columns ``A``..``Z`` (empty cells are absent options), ``answer`` (a letter), optional
  ``category``, ``hint``, and ``image`` (base64 JPEG/PNG). As in VLMEvalKit, an ``image`` cell of
  at most 64 characters is the ``index`` of another row whose image it shares.
- LLaVA JSON / InternVL JSONL with references (read by `fundusrt.training.records`): every turn is
  an item whose reference is the recorded answer; records written by `fundusrt.synth.instructions`
  also carry the ground truth used for the clinical consistency score.
- Synthetic DICOM studies (`fundusrt.synth.write_study`): a folder of studies, each a folder
  with DICOM files and ``ground_truth.json``.

The kind of a set is told from its content, not its name: a folder is studies; a file whose first
line is tab-separated with ``question`` and ``answer`` columns is an MCQ TSV; anything else is read
as LLaVA/InternVL JSON. A bad row or record is recorded as an issue and the rest is read.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.bench.metrics import OPTION_LETTERS, mcq_prompt
from fundusrt.synth.grading import GroundTruth
from fundusrt.synth.study import GROUND_TRUTH_NAME

KINDS = ("mcq", "open", "studies")
_IMAGE_REF_MAX = 64  # VLMEvalKit: shorter image cells are indices of rows holding the image


class EvalSetError(ValueError):
    """An evaluation set cannot be read at all (a bad row only becomes an issue)."""


@dataclass
class EvalItem:
    """One question about one image (mcq, open) or one DICOM study (studies).

    Attributes:
        item_id: the row index, record id and turn, or the study folder name.
        load: returns the (H, W, 3) uint8 image; None for studies.
        question: the prompt as sent to the model (MCQ: VLMEvalKit's prompt with the options).
        options, answer: MCQ options (letter -> text) and the correct letter.
        references: reference answers of open questions.
        truth: ground truth of the image (open) when known.
        study_dir, study_truth: the study folder and its per-instance ground truth (SOP UID -> truth).
        category: the MCQ category or the synthetic question type.
    """

    item_id: str
    load: Callable[[], np.ndarray] | None = None
    question: str = ""
    options: dict[str, str] = field(default_factory=dict)
    answer: str | None = None
    references: list[str] = field(default_factory=list)
    truth: GroundTruth | None = None
    study_dir: Path | None = None
    study_truth: dict[str, GroundTruth] = field(default_factory=dict)
    category: str | None = None


@dataclass
class EvalSet:
    """A read evaluation set: its items and the rows that could not be used."""

    name: str
    kind: str
    source: str
    items: list[EvalItem]
    issues: list[str] = field(default_factory=list)


def decode_base64_image(data: str) -> np.ndarray:
    """A base64 JPEG/PNG string -> (H, W, 3) uint8 RGB.

    Raises:
        ValueError: not base64, or not an image Pillow can read.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image cell is not valid base64 ({exc})") from exc
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image cell is base64 but not a readable image ({exc})") from exc


def _cell(row: dict[str, str | None], key: str) -> str:
    value = row.get(key)
    return "" if value is None else value.strip()


def read_mcq_tsv(path: str | Path, name: str | None = None) -> EvalSet:
    """Read a VLMEvalKit MCQ TSV (format in the module docstring).

    Raises:
        EvalSetError: the file cannot be read or lacks the index/question/answer/image columns.
    """
    file = Path(path)
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's 128 KiB default
    try:
        with open(file, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
            columns = rows[0].keys() if rows else set()
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvalSetError(f"cannot read MCQ TSV {file}: {exc}") from exc
    missing = [c for c in ("index", "question", "answer", "image") if c not in columns]
    if not rows or missing:
        raise EvalSetError(f"{file} is not a VLMEvalKit MCQ TSV: "
                           + (f"missing columns {missing}" if rows else "no rows")
                           + " (needs index, question, A, B, ..., answer, image)")
    images = {_cell(r, "index"): _cell(r, "image") for r in rows}
    letters = [c for c in OPTION_LETTERS if c in columns]
    result = EvalSet(name or file.stem, "mcq", str(file), [])
    for line, row in enumerate(rows, 2):
        index = _cell(row, "index")
        image = _cell(row, "image")
        if len(image) <= _IMAGE_REF_MAX:
            image = images.get(image, "")
        options = {c: _cell(row, c) for c in letters if _cell(row, c)}
        answer = _cell(row, "answer")
        problem = ("no image (nor an index of a row with one)" if len(image) <= _IMAGE_REF_MAX
                   else "fewer than two options" if len(options) < 2
                   else f"answer {answer!r} is not one of the options {sorted(options)}" if answer not in options
                   else None)
        if problem is None:
            try:
                pixels = decode_base64_image(image)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            result.issues.append(f"{file}:{line} (index {index or '?'}): {problem}")
            continue
        result.items.append(EvalItem(
            item_id=index, load=lambda p=pixels: p, options=options, answer=answer,
            question=mcq_prompt(_cell(row, "question"), options, _cell(row, "hint") or None),
            category=_cell(row, "category") or None))
    return result


def read_instruction_set(path: str | Path, name: str | None = None) -> EvalSet:
    """Read LLaVA JSON / InternVL JSONL records with references: one item per (question, answer) turn.

    Raises:
        EvalSetError: the file cannot be read.
    """
    from fundusrt.training.records import DataError, Record, read_records
    from fundusrt.training.samples import load_image

    file = Path(path)
    result = EvalSet(name or file.stem, "open", str(file), [])
    try:
        for record in read_records(file):
            if not isinstance(record, Record):
                result.issues.append(str(record))
                continue
            if len(record.images) != 1:
                result.issues.append(f"{record.where}: {len(record.images)} images; the bench asks about one")
                continue
            annotations = record.extra.get("fundusrt", {})
            types = annotations.get("types") if isinstance(annotations, dict) else None
            try:
                truth = GroundTruth.from_dict(annotations["truth"]) if "truth" in annotations else None
            except (ValueError, TypeError) as exc:
                result.issues.append(f"{record.where}: unreadable ground truth ({exc})")
                truth = None
            image_path = record.images[0]
            for turn, (question, answer) in enumerate(record.turns):
                result.items.append(EvalItem(
                    item_id=f"{record.extra.get('id', record.where)}#{turn}",
                    load=lambda p=image_path: load_image(p),
                    question=question.replace("<image>\n", "").replace("<image>", "").strip(),
                    references=[answer], truth=truth,
                    category=types[turn] if isinstance(types, list) and turn < len(types) else None))
    except DataError as exc:
        raise EvalSetError(str(exc)) from exc
    return result


def read_study_set(path: str | Path, name: str | None = None) -> EvalSet:
    """Read a folder of synthetic studies (sub-folders holding ground_truth.json) or one such study.

    Raises:
        EvalSetError: the folder holds no study with ground truth.
    """
    root = Path(path)
    if (root / GROUND_TRUTH_NAME).is_file():
        folders = [root]
    elif root.is_dir():
        folders = sorted(p for p in root.iterdir() if (p / GROUND_TRUTH_NAME).is_file())
    else:
        folders = []
    result = EvalSet(name or root.name, "studies", str(root), [])
    for folder in folders:
        try:
            data = json.loads((folder / GROUND_TRUTH_NAME).read_text(encoding="utf-8"))
            truths = {uid: GroundTruth.from_dict(entry) for uid, entry in data["instances"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            result.issues.append(f"{folder / GROUND_TRUTH_NAME}: unreadable ground truth ({exc})")
            continue
        result.items.append(EvalItem(item_id=folder.name, study_dir=folder, study_truth=truths))
    if not result.items:
        raise EvalSetError(f"{root} holds no study with {GROUND_TRUTH_NAME} "
                           "(write one with `fundusrt synth` or fundusrt.synth.write_study)"
                           + (f"; problems: {'; '.join(result.issues)}" if result.issues else ""))
    return result


def detect_kind(path: str | Path) -> str:
    """"studies", "mcq" or "open", told from the content (see the module docstring)."""
    source = Path(path)
    if source.is_dir():
        return "studies"
    if not source.is_file():
        raise EvalSetError(f"evaluation set {source} does not exist")
    with open(source, "rb") as f:
        head = f.readline(1 << 16).decode("utf-8", errors="replace")
    columns = head.rstrip("\r\n").split("\t")
    return "mcq" if "question" in columns and "answer" in columns else "open"


def read_eval_set(path: str | Path, name: str | None = None) -> EvalSet:
    """Read an evaluation set of any kind (told from the content)."""
    reader = {"studies": read_study_set, "mcq": read_mcq_tsv, "open": read_instruction_set}[detect_kind(path)]
    return reader(path, name)


def summarise(eval_set: EvalSet) -> dict[str, Any]:
    """The set's identity for the bench JSON."""
    return {"name": eval_set.name, "kind": eval_set.kind, "source": eval_set.source, "items": len(eval_set.items),
            "issues": eval_set.issues}

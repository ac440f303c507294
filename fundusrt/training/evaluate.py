"""Accuracy per question type of an exported model package on annotated instruction data, through the
real runtime (`fundusrt.load_package`), one single-turn question at a time as a user would ask it."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fundusrt.config import GenerationConfig
from fundusrt.synth.instructions import CLOSED_TYPES, parse_closed_answer
from fundusrt.training.records import DataError, Record, read_records
from fundusrt.training.samples import load_image


def evaluate_package(
    package_dir: str | Path,
    data_file: str | Path,
    *,
    limit: int | None = None,
    image_root: str | Path | None = None,
    backend: str = "ort-cpu",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Ask every closed question of every annotated record and score the answers.

    Records must carry `"fundusrt": {"types": [...]}` naming each turn's question type (as written
    by `fundusrt.synth.instructions`); the reference is the record's own answer.

    Args:
        package_dir: an exported model package.
        data_file: LLaVA JSON or InternVL JSONL with annotated records.
        limit: evaluate at most this many records.
        image_root: folder relative image paths start from (default: the data file's folder).
        backend: runtime backend name.
        log: progress sink (default: stderr).

    Returns:
        {"per_type": {type: {"correct", "total", "accuracy", "unparsed"}}, "images", "seconds", ...}.
    """
    from fundusrt.runtime.pipeline import load_package

    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    pipeline = load_package(package_dir, backend=backend)
    gen = GenerationConfig(max_new_tokens=8)
    scores = {t: {"correct": 0, "total": 0, "unparsed": 0} for t in CLOSED_TYPES}
    examples: list[dict[str, str]] = []
    start, images = time.perf_counter(), 0
    for item in read_records(data_file, image_root):
        if limit is not None and images >= limit:
            break
        if not isinstance(item, Record):
            say(f"skipped: {item}")
            continue
        types = item.extra.get("fundusrt", {}).get("types")
        if not isinstance(types, list) or len(types) != len(item.turns):
            raise DataError(f"{item.where}: record has no 'fundusrt.types' list matching its turns; evaluation "
                            "needs question types (write the data with fundusrt.synth.instructions)")
        asked = [(t, q, a) for t, (q, a) in zip(types, item.turns, strict=True) if t in CLOSED_TYPES]
        if not asked:
            continue
        answers = pipeline.ask_many(load_image(item.images[0]), [q for _, q, _ in asked], gen)
        for (qtype, question, reference), answer in zip(asked, answers, strict=True):
            got = parse_closed_answer(qtype, answer.text)
            score = scores[qtype]
            score["total"] += 1
            score["correct"] += int(got is not None and got == parse_closed_answer(qtype, reference))
            score["unparsed"] += int(got is None)
            if len(examples) < 10:
                examples.append({"question": question.replace("<image>\n", ""), "reference": reference,
                                 "answer": answer.text})
        images += 1
        if images % 50 == 0:
            say(f"evaluated {images} images")
    per_type = {t: {**s, "accuracy": round(s["correct"] / s["total"], 4)} for t, s in scores.items() if s["total"]}
    return {"package": pipeline.manifest.name, "backend": backend, "data": str(data_file), "images": images,
            "per_type": per_type, "seconds": round(time.perf_counter() - start, 1), "examples": examples}

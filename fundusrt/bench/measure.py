"""Measuring one engine (a package on a backend, or the baseline) on evaluation sets: latency and accuracy.

An engine is anything with `ask_many(image, questions, gen) -> list[Answer]` (the runtime's
`Pipeline`, the transformers baseline). Per evaluation set:

- latency: the first `latency_items` items, after `warmup` untimed runs, each run `repeats` times;
  every run records its stages (DICOM decode for studies, patching, vision, connector, time to
  first token, decode tok/s) and its end-to-end time, summarised as p50/p95/p99 (e2e) and medians
  (stages).
- accuracy: every item (up to `limit`) once, greedy, scored by the set's kind: MCQ accuracy by
  option letter; BLEU-4, ROUGE-L, closed-question accuracy and clinical consistency for open
  questions; clinical consistency per image for DICOM studies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from fundusrt.bench.clinical import consistency_score
from fundusrt.bench.evalsets import EvalItem, EvalSet
from fundusrt.bench.machine import gpu_memory_mib
from fundusrt.bench.metrics import bleu4, extract_option, rouge_l
from fundusrt.config import GenerationConfig
from fundusrt.runtime.pipeline import Answer
from fundusrt.synth.instructions import CLOSED_TYPES, QUESTIONS, parse_closed_answer

# What the study set asks of every image: the report question the demo model is trained on.
STUDY_QUESTIONS = (QUESTIONS["report"],)
STAGES = ("dicom_ms", "patchify_ms", "vision_ms", "connector_ms", "ttft_ms", "decode_tok_s", "new_tokens")


class Engine(Protocol):
    """What the harness measures."""

    def ask_many(self, image: np.ndarray, questions: Sequence[str],
                 gen: GenerationConfig | None = None) -> list[Answer]:
        """Answer questions about one image."""
        ...


@dataclass(frozen=True)
class MeasureSettings:
    """How much to run: warm-up and repeated runs for latency, items for accuracy, answer length."""

    warmup: int = 1
    repeats: int = 5
    latency_items: int = 1
    limit: int | None = None
    max_new_tokens: int = 32
    sample_gpu_memory: bool = False

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.latency_items < 1 or self.max_new_tokens < 1:
            raise ValueError(f"need warmup >= 0, repeats >= 1, latency_items >= 1, max_new_tokens >= 1; got {self}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 (or None for all items), got {self.limit}")


@dataclass
class Run:
    """One timed run of one item: stage timings and the generated texts (one per image and question)."""

    stages: dict[str, float]
    e2e_ms: float
    texts: list[tuple[str, str]]  # (image key: "" or SOP Instance UID, answer text)


def _answer_stages(answers: Sequence[Answer]) -> dict[str, float]:
    first = answers[0].timings
    decode_ms = sum(a.timings["decode_ms"] for a in answers)
    steps = sum(a.timings["decode_steps"] for a in answers)
    return {"patchify_ms": first["patchify_ms"], "vision_ms": first["vision_ms"],
            "connector_ms": first["connector_ms"],
            "ttft_ms": first.get("shared_prefill_ms", 0.0) + first["prefill_ms"],
            "decode_tok_s": steps / (decode_ms / 1000.0) if steps and decode_ms > 0 else 0.0,
            "new_tokens": float(sum(len(a.token_ids) for a in answers)),
            "prompt_tokens": first["prompt_tokens"]}


def run_item(engine: Engine, item: EvalItem, gen: GenerationConfig) -> Run:
    """Run one item once: an image question, or every image of a DICOM study (DICOM decode timed)."""
    if item.study_dir is None:
        assert item.load is not None
        image = item.load()
        start = time.perf_counter()
        answers = engine.ask_many(image, [item.question], gen)
        e2e = (time.perf_counter() - start) * 1000.0
        return Run({"dicom_ms": 0.0, **_answer_stages(answers)}, e2e, [("", answers[0].text)])
    from fundusrt.dicom import read_study

    start = time.perf_counter()
    study = read_study(item.study_dir)
    dicom_ms = (time.perf_counter() - start) * 1000.0
    if not study.images:
        raise ValueError(f"study {item.study_dir} has no readable fundus image")
    per_image, texts = [], []
    for image in study.images:
        answers = engine.ask_many(image.pixels, list(STUDY_QUESTIONS), gen)
        per_image.append(_answer_stages(answers))
        texts.append((image.sop_instance_uid, "\n".join(a.text for a in answers)))
    e2e = (time.perf_counter() - start) * 1000.0
    # Per-image stages are means over the study's images; the study's e2e covers all of them.
    stages = {k: float(np.mean([s[k] for s in per_image])) for k in per_image[0]}
    return Run({"dicom_ms": dicom_ms / len(study.images), **stages, "images": float(len(study.images))}, e2e, texts)


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(np.asarray(values, dtype=np.float64), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(np.mean(values)),
            "runs": len(values)}


def measure_latency(engine: Engine, eval_set: EvalSet, settings: MeasureSettings,
                    gen: GenerationConfig) -> dict[str, Any]:
    """Warm up, then time the set's first items `repeats` times each (see the module docstring)."""
    probes = eval_set.items[:settings.latency_items]
    for _ in range(settings.warmup):
        run_item(engine, probes[0], gen)
    runs, gpu_samples = [], []
    for _ in range(settings.repeats):
        for item in probes:
            runs.append(run_item(engine, item, gen))
            if settings.sample_gpu_memory:
                gpu_samples.append(gpu_memory_mib())
    held = [m for m in gpu_samples if m is not None]
    return {"e2e_ms": _percentiles([r.e2e_ms for r in runs]),
            "stages": {k: float(np.median([r.stages[k] for r in runs])) for k in runs[0].stages},
            "peak_gpu_memory_mib": max(held) if held else None}


def score(eval_set: EvalSet, items: Sequence[EvalItem], runs: Sequence[Run]) -> dict[str, Any]:
    """Accuracy metrics of a set's answers; `primary` names the one the Pareto plot uses."""
    if eval_set.kind == "mcq":
        picked = [extract_option(run.texts[0][1], item.options) for item, run in zip(items, runs, strict=True)]
        correct = [p == item.answer for p, item in zip(picked, items, strict=True)]
        categories: dict[str, list[bool]] = {}
        for item, ok in zip(items, correct, strict=True):
            categories.setdefault(item.category or "", []).append(ok)
        return {"primary": "accuracy", "accuracy": float(np.mean(correct)),
                "unparsed": sum(p is None for p in picked),
                "per_category": {c: float(np.mean(v)) for c, v in categories.items()}}
    if eval_set.kind == "open":
        texts = [run.texts[0][1] for run in runs]
        result: dict[str, Any] = {"bleu4": bleu4(texts, [i.references for i in items]),
                                  "rouge_l": rouge_l(texts, [i.references for i in items])}
        closed = [(i, t) for i, t in zip(items, texts, strict=True) if i.category in CLOSED_TYPES]
        if closed:
            result["closed_accuracy"] = float(np.mean([
                parse_closed_answer(i.category, t) == parse_closed_answer(i.category, i.references[0])
                for i, t in closed]))
        graded = [(t, i.truth) for i, t in zip(items, texts, strict=True)
                  if i.truth is not None and i.category not in CLOSED_TYPES]
        if graded:
            result["clinical_consistency"] = consistency_score(*map(list, zip(*graded, strict=True)))
        result["primary"] = "clinical_consistency" if graded else "rouge_l"
        return result
    pairs = [(text, item.study_truth[uid]) for item, run in zip(items, runs, strict=True)
             for uid, text in run.texts if uid in item.study_truth]
    texts_, truths = ([p[0] for p in pairs], [p[1] for p in pairs])
    return {"primary": "clinical_consistency", "clinical_consistency": consistency_score(texts_, truths),
            "images": len(pairs)}


def primary_value(metrics: dict[str, Any]) -> float:
    """The number behind `metrics["primary"]` (consistency is a dict with a score)."""
    value = metrics[metrics["primary"]]
    return float(value["score"] if isinstance(value, dict) else value)


def measure_accuracy(engine: Engine, eval_set: EvalSet, settings: MeasureSettings,
                     gen: GenerationConfig) -> dict[str, Any]:
    """Run every item (up to `limit`) once and score the answers; an item that fails is counted, not fatal."""
    items = eval_set.items[:settings.limit] if settings.limit else eval_set.items
    done_items, runs, failures = [], [], []
    for item in items:
        try:
            runs.append(run_item(engine, item, gen))
            done_items.append(item)
        except ValueError as exc:  # a bad image or an over-long prompt must not sink the set
            failures.append(f"{item.item_id}: {exc}")
    if not runs:
        return {"primary": None, "failures": failures, "items": 0}
    metrics = score(eval_set, done_items, runs)
    examples = [{"item": i.item_id, "question": i.question[:200], "answer": r.texts[0][1][:200]}
                for i, r in list(zip(done_items, runs, strict=True))[:3]]
    return {**metrics, "items": len(runs), "failures": failures, "examples": examples}

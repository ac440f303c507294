"""How well a package answers its screening protocol: scored tables, per-item accuracy, AUC and operating points.

A *scored table* (CSV, one row per case x item x option: case, item, option, probability, truth) holds
what a package answered on a labelled set and what was right. `score_synthetic` writes one from
held-out `fundusrt.synth` cases (ground truth from the generator); any other labelled set can be
written in the same form. From a table:

- `evaluate`: per item, accuracy of the likeliest option; for items with a yes/no reading (findings
  and gradability by their positive options, laterality by its first option, a grade by the referral
  rule's positive options when the referral item is that grade, else "not the first option") the ROC
  AUC and sensitivity / specificity at the operating point (the referral threshold for the referral
  item, 0.5 for the others), each with its 95% interval (`fundusrt.bench.roc`);
- `calibrate`: the referral threshold that reaches a target sensitivity, written into a copy of the
  protocol with the table's sha256, so a report names the threshold and the set it came from.

Sets: "heldout" draws what the demo was trained on (the sizes of `SMALL_SIZES`, picked by seed) from
seeds no training run uses; "shifted" draws the same cases with other generator settings (camera
sizes, exposure gain 0.6-1.4, sensor noise) so that the figures are not only those of the training
distribution.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.bench.roc import at_threshold, auc, threshold_for_sensitivity, wilson
from fundusrt.dicom.gradability import assess_gradability
from fundusrt.manifest import atomic_write_text
from fundusrt.runtime.protocol import GRADABLE_MIN_PROBABILITY, Item, Protocol, load_protocol

# seeds of the demo's held-out cases (models/demo/README.md): far above every training seed
HELDOUT_SEED_START = 1_000_000
SETS = ("heldout", "shifted")
# sizes the demo never trained on: camera frames, larger and of other aspect ratios than SMALL_SIZES
SHIFTED_SIZES = ((640, 480), (800, 800), (1024, 683), (720, 540))
TABLE_COLUMNS = ("case", "item", "option", "probability", "truth")


@dataclass(frozen=True)
class Case:
    """One scored case: item id -> (option probabilities, the true answer)."""

    name: str
    items: dict[str, tuple[dict[str, float], str]]


def synthetic_image(seed: int, which: str) -> tuple[np.ndarray, Any]:
    """The picture and ground truth of held-out case `seed` in set `which` ("heldout" or "shifted")."""
    from fundusrt.synth.fundus import draw_fundus, random_case
    from fundusrt.synth.instructions import SMALL_SIZES

    if which not in SETS:
        raise ValueError(f"unknown set {which!r}; choose one of {SETS}")
    if which == "heldout":
        return draw_fundus(random_case(seed, *SMALL_SIZES[seed % len(SMALL_SIZES)]))
    image, truth = draw_fundus(random_case(seed, *SHIFTED_SIZES[seed % len(SHIFTED_SIZES)]))
    rng = np.random.default_rng([seed, 11])
    shifted = image.astype(np.float32) * rng.uniform(0.6, 1.4) + rng.normal(0.0, 4.0, image.shape)
    return np.clip(shifted, 0, 255).astype(np.uint8), truth


def score_synthetic(pipeline: Any, count: int, which: str = "heldout", first_seed: int = HELDOUT_SEED_START,
                    protocol: Protocol | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Score `count` synthetic cases with a pipeline's protocol.

    Returns:
        (table rows, summary): the summary has the set, seeds, how many images the pixel gate
        passed, and the mean scoring time per image.

    Raises:
        ValueError: a protocol item has no synthetic ground truth (its id is not a closed question type
            of `fundusrt.synth.instructions`).
    """
    from fundusrt.synth.instructions import CLOSED_TYPES, expected_answer

    protocol = protocol or pipeline.protocol
    unknown = [i.id for i in protocol.items if i.id not in CLOSED_TYPES]
    if unknown:
        raise ValueError(f"items {unknown} have no synthetic ground truth (known: {', '.join(CLOSED_TYPES)})")
    rows, gradable, scoring_ms = [], 0, 0.0
    for seed in range(first_seed, first_seed + count):
        image, truth = synthetic_image(seed, which)
        gradable += assess_gradability(image).gradable
        for item_id, score in pipeline.score(image, protocol).items():
            scoring_ms += score.scoring_ms
            rows += [{"case": f"{which}-{seed}", "item": item_id, "option": option, "probability": p,
                      "truth": expected_answer(item_id, truth)} for option, p in score.probabilities.items()]
    summary = {"set": which, "first_seed": first_seed, "count": count, "pixel_gradable": gradable,
               "mean_scoring_ms_per_image": scoring_ms / max(count, 1)}
    return rows, summary


def gate_figures(count: int, first_seed: int = HELDOUT_SEED_START, pipeline: Any = None) -> dict[str, Any]:
    """The gradability gate on synthetic cases carrying defects at their realistic rate (`fundusrt.synth.quality`).

    Sensitivity = ungradable pictures refused, specificity = gradable ones passed, with 95% intervals,
    and per defect how many were refused and for which reason. First for the pixel checks alone; with
    a `pipeline` whose protocol has a gradability item, also for that item alone (scored on every
    picture, AUC of P(gradable)) and for the gate the runtime applies: the pixel checks, then the item
    on what they passed.

    Raises:
        ValueError: the pipeline's protocol has no gradability item.
    """
    from fundusrt.synth.quality import apply_defect, defect_for

    gate = None
    if pipeline is not None:
        gate = next((i for i in pipeline.protocol.items if i.role == "gradability"), None)
        if gate is None:
            raise ValueError(f"protocol {pipeline.protocol.name} {pipeline.protocol.version} has no gradability item")
        only_gate = dataclasses.replace(pipeline.protocol, items=(gate,))
    pixel_refused, model_p, both_refused, defects, per_defect = [], [], [], [], {}
    for seed in range(first_seed, first_seed + count):
        image, _ = synthetic_image(seed, "heldout")
        defect = defect_for(seed)
        picture = image if defect is None else apply_defect(image, defect, seed)
        verdict = assess_gradability(picture)
        pixel_refused.append(not verdict.gradable)
        defects.append(defect)
        if gate is not None:
            probs = pipeline.score(picture, only_gate)[gate.id].probabilities
            model_p.append(sum(probs[a] for a in gate.positive))
            both_refused.append(not verdict.gradable or model_p[-1] < GRADABLE_MIN_PROBABILITY)
        if defect is None:
            continue
        caught = per_defect.setdefault(defect, {"cases": 0, "refused": 0, "reasons": {}})
        caught["cases"] += 1
        caught["refused"] += not verdict.gradable
        for reason in verdict.reasons:
            key = reason.split(":")[0]
            caught["reasons"][key] = caught["reasons"].get(key, 0) + 1
        if gate is not None:
            caught["refused_by_pixels_or_model"] = caught.get("refused_by_pixels_or_model", 0) + both_refused[-1]

    def figures(refused: Sequence[bool]) -> dict[str, Any]:
        bad = [r for r, d in zip(refused, defects, strict=True) if d is not None]
        good = [r for r, d in zip(refused, defects, strict=True) if d is None]
        right = sum(bad) + len(good) - sum(good)
        return {"sensitivity": wilson(sum(bad), len(bad)).to_dict(),
                "specificity": wilson(len(good) - sum(good), len(good)).to_dict(),
                "accuracy": wilson(right, count).to_dict()}

    result = {"first_seed": first_seed, "count": count, **figures(pixel_refused), "defects": per_defect}
    if gate is not None:
        ungradable = [d is not None for d in defects]
        area, low, high = auc([1 - p for p in model_p], ungradable)
        result["model_item"] = {"item": gate.id, "auc": {"value": area, "ci95": [low, high]},
                                **figures([p < GRADABLE_MIN_PROBABILITY for p in model_p])}
        result["pixels_then_model"] = figures(both_refused)
    return result


def write_table(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write a scored table as CSV (atomically)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: row[k] for k in TABLE_COLUMNS} for row in rows)
    atomic_write_text(Path(path), buffer.getvalue())
    return Path(path)


def read_table(path: str | Path) -> tuple[list[Case], str]:
    """The cases of a scored table and the table's sha256.

    Raises:
        ValueError: a column is missing or a probability is not a number.
    """
    raw = Path(path).read_bytes()
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    missing = set(TABLE_COLUMNS) - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"{path}: a scored table needs the columns {', '.join(TABLE_COLUMNS)}; "
                         f"missing {sorted(missing)}")
    rows = []
    for line, row in enumerate(reader, 2):
        try:
            rows.append({**row, "probability": float(row["probability"])})
        except ValueError as exc:
            raise ValueError(f"{path} line {line}: probability {row['probability']!r} is not a number") from exc
    return cases_from_rows(rows), hashlib.sha256(raw).hexdigest()


def cases_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[Case]:
    """Table rows grouped into cases, in the order they first appear."""
    cases: dict[str, dict[str, tuple[dict[str, float], str]]] = {}
    for row in rows:
        probs, _ = cases.setdefault(row["case"], {}).setdefault(row["item"], ({}, row["truth"]))
        probs[row["option"]] = float(row["probability"])
    return [Case(name, items) for name, items in cases.items()]


def screening_figures(package: str | Path, count: int, threads: int | None = None) -> dict[str, Any]:
    """A package's protocol measured on `count` held-out synthetic cases (ort-cpu): what `fundusrt bench` reports.

    Returns:
        {"package", "protocol", "set", "count", "pixel_gradable", "mean_scoring_ms_per_image", "items"}
        with `evaluate`'s figures under "items".
    """
    from fundusrt.runtime.pipeline import load_package

    pipeline = load_package(package, threads=threads)
    rows, summary = score_synthetic(pipeline, count)
    return {"package": str(package), "protocol": pipeline.protocol.identity(), **summary,
            "items": evaluate(pipeline.protocol, cases_from_rows(rows))}


def binary_reading(protocol: Protocol, item: Item) -> tuple[str, ...]:
    """The options that make an item's yes/no reading positive (module docstring)."""
    if item.role in ("finding", "gradability"):
        return item.positive
    if item.role == "grade":
        return protocol.referral.positive if protocol.referral.item == item.id else tuple(item.answers[1:])
    return (item.answers[0],)


def _scores(cases: Sequence[Case], item_id: str, positive: Sequence[str]) -> tuple[list[float], list[bool]]:
    scored = [c.items[item_id] for c in cases if item_id in c.items]
    return [sum(probs.get(a, 0.0) for a in positive) for probs, _ in scored], [truth in positive for _, truth in scored]


def evaluate(protocol: Protocol, cases: Sequence[Case]) -> dict[str, dict[str, Any]]:
    """Per item: n, accuracy, and for its yes/no reading AUC, sensitivity and specificity (95% intervals)."""
    results = {}
    for item in protocol.items:
        scored = [c.items[item.id] for c in cases if item.id in c.items]
        if not scored:
            continue
        right = sum(max(probs, key=probs.get) == truth for probs, truth in scored)
        entry: dict[str, Any] = {"n": len(scored), "accuracy": wilson(right, len(scored)).to_dict()}
        positive = binary_reading(protocol, item)
        scores, labels = _scores(cases, item.id, positive)
        if any(labels) and not all(labels):
            threshold = protocol.referral.threshold if item.id == protocol.referral.item else 0.5
            area, low, high = auc(scores, labels)
            sensitivity, specificity = at_threshold(scores, labels, threshold)
            entry |= {"positive": list(positive), "threshold": threshold, "auc": {"value": area, "ci95": [low, high]},
                      "sensitivity": sensitivity.to_dict(), "specificity": specificity.to_dict()}
        results[item.id] = entry
    return results


def calibrate(protocol_path: str | Path, table_path: str | Path, target_sensitivity: float,
              out_path: str | Path) -> dict[str, Any]:
    """Write a copy of a protocol whose referral threshold reaches `target_sensitivity` on a scored table.

    Returns:
        the calibration record written under referral.calibration (threshold, target, achieved
        sensitivity and specificity with intervals, AUC, the table's sha256 and size).

    Raises:
        ProtocolError: the protocol is invalid.
        ValueError: the output would overwrite the input, or the table lacks positive or negative cases.
    """
    protocol = load_protocol(protocol_path)
    if Path(out_path).resolve() == Path(protocol_path).resolve():
        raise ValueError("calibrate writes a new protocol file: choose an --out other than the input")
    cases, table_sha256 = read_table(table_path)
    rule = protocol.referral
    scores, labels = _scores(cases, rule.item, rule.positive)
    threshold = threshold_for_sensitivity(scores, labels, target_sensitivity)
    sensitivity, specificity = at_threshold(scores, labels, threshold)
    area, low, high = auc(scores, labels)
    record = {"target_sensitivity": target_sensitivity, "threshold": threshold,
              "sensitivity": sensitivity.to_dict(), "specificity": specificity.to_dict(),
              "auc": {"value": area, "ci95": [low, high]}, "set_sha256": table_sha256, "set_cases": len(scores)}
    data = json.loads(Path(protocol_path).read_text())
    data["referral"] = {**data["referral"], "threshold": threshold, "calibration": record}
    atomic_write_text(Path(out_path), json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    load_protocol(out_path)  # what was written must read back
    return record

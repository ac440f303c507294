"""Screening accuracy from scores and labels: ROC, AUC, sensitivity / specificity with 95% intervals, and
the operating point that reaches a target sensitivity.

A case is called positive when its score is >= the threshold (the runtime's referral rule).
- AUC is the Mann-Whitney probability that a positive case scores above a negative one (ties 1/2);
  its 95% interval is Hanley & McNeil's (1982) normal approximation, clipped to [0, 1].
- Sensitivity and specificity intervals are Wilson score intervals (95%), which stay inside [0, 1]
  and behave at 0 and 1, unlike the Wald interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class Proportion:
    """A proportion k/n with its 95% Wilson interval."""

    value: float
    low: float
    high: float
    k: int
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"value": self.value, "ci95": [self.low, self.high], "k": self.k, "n": self.n}


def wilson(k: int, n: int) -> Proportion:
    """k successes of n with the Wilson score 95% interval (NaN values when n is 0)."""
    if n == 0:
        return Proportion(math.nan, math.nan, math.nan, k, n)
    p = k / n
    denominator = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denominator
    return Proportion(p, max(0.0, centre - half), min(1.0, centre + half), k, n)


def _split(scores: Sequence[float], labels: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    values, truth = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool)
    if values.shape != truth.shape or values.ndim != 1:
        raise ValueError(f"need as many scores as labels, got {values.shape} and {truth.shape}")
    if not truth.any() or truth.all():
        raise ValueError(f"need positive and negative cases, got {int(truth.sum())} positive of {len(truth)}")
    return values[truth], values[~truth]


def roc_curve(scores: Sequence[float], labels: Sequence[bool]) -> list[tuple[float, float, float]]:
    """(threshold, false positive rate, true positive rate) at every distinct score, highest first,
    after the point (inf, 0, 0)."""
    positive, negative = _split(scores, labels)
    points = [(math.inf, 0.0, 0.0)]
    for threshold in np.unique(np.concatenate([positive, negative]))[::-1]:
        points.append((float(threshold), float((negative >= threshold).mean()), float((positive >= threshold).mean())))
    return points


def auc(scores: Sequence[float], labels: Sequence[bool]) -> tuple[float, float, float]:
    """ROC AUC and its 95% interval (low, high)."""
    positive, negative = _split(scores, labels)
    above = (positive[:, None] > negative[None, :]).sum() + 0.5 * (positive[:, None] == negative[None, :]).sum()
    area = float(above / (len(positive) * len(negative)))
    q1, q2 = area / (2 - area), 2 * area * area / (1 + area)
    variance = (area * (1 - area) + (len(positive) - 1) * (q1 - area**2) + (len(negative) - 1) * (q2 - area**2)) / (
        len(positive) * len(negative))
    half = Z95 * math.sqrt(max(variance, 0.0))
    return area, max(0.0, area - half), min(1.0, area + half)


def at_threshold(scores: Sequence[float], labels: Sequence[bool], threshold: float) -> tuple[Proportion, Proportion]:
    """Sensitivity and specificity when cases scoring >= threshold are called positive."""
    positive, negative = _split(scores, labels)
    return (wilson(int((positive >= threshold).sum()), len(positive)),
            wilson(int((negative < threshold).sum()), len(negative)))


def threshold_for_sensitivity(scores: Sequence[float], labels: Sequence[bool], target: float) -> float:
    """The highest threshold whose sensitivity is >= target (the most specific such operating point).

    Raises:
        ValueError: target outside (0, 1], or the set lacks positive or negative cases.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    positive, _ = _split(scores, labels)
    # sorted high to low, the k-th positive score is the highest threshold that keeps k positives
    needed = math.ceil(target * len(positive) - 1e-9)
    return float(np.sort(positive)[::-1][needed - 1])

"""Is a fundus photograph good enough to grade? Deterministic pixel checks on the field of view.

Run before the model: a picture that is too dark, burnt out, hazy, out of focus or mostly outside the
frame must be reported as ungradable (retake the photo), never passed off as a normal eye by a model
that answers "No" to every question about it. Numpy only.

The checks work on the field of view (`fundusrt.kernels.roi`) resampled by area averaging so that the
field's diameter is WORK_DIAMETER pixels: sharpness is then measured at the same scale on every camera.
Each threshold below says what it guards against; a failed check adds its reason to the verdict.

Thresholds were set between the committed real photograph (tests/data, CC0: mean luma 121, contrast
0.146, sharpness 0.038, coverage 1.0) and its degraded versions, and checked not to reject
`fundusrt.synth` pictures (150 drawn: contrast >= 0.142, sharpness >= 0.043, coverage >= 0.89);
tests/test_gradability.py holds both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from fundusrt.kernels.roi import check_image, find_fundus_roi

# the field is resampled so that its diameter is about this many pixels before measuring
WORK_DIAMETER = 512
# mean luma (0-255) of the field below which detail in the dark (haemorrhages, microaneurysms) is lost
# in sensor noise: an underexposed photograph, or a small pupil
MIN_MEAN_LUMA = 25.0
# share of field pixels at or above SATURATED_LUMA beyond which bright lesions (exudates, drusen)
# cannot be told from a burnt-out background: an overexposed photograph
SATURATED_LUMA = 245
MAX_SATURATED_SHARE = 0.25
# mean field luma above which the picture is washed out even where it is not saturated (the real
# photograph's is 121, synthetic ones 83-116)
MAX_MEAN_LUMA = 200.0
# luma standard deviation over the mean across the field below which the vessels and the disc do
# not stand out: haze (cataract, a dirty lens, flare); half the real photograph's 0.146
MIN_CONTRAST = 0.07
# mean absolute Laplacian over the mean luma (at WORK_DIAMETER) below which vessel edges are smeared:
# defocus or motion blur; a third of the real photograph's 0.038 (a Gaussian blur of sigma 4 px on
# its 1024 px field gives 0.006)
MIN_SHARPNESS = 0.012
# share of the round field (its diameter being the field's long side) that is inside the frame and lit;
# below it, much of the retina is outside the picture (off-centre or a partly out-of-field capture)
MIN_COVERAGE = 0.7
# field diameter over the frame's short side below which the light reached only the middle of the
# retina: a small pupil or heavy vignetting (cameras frame the whole field: the real photograph's is 1.0)
MIN_FIELD_SIZE = 0.6
# pixels this close to the field's rim (fraction of the radius) are left out: vignetting and flare
_INNER_FRACTION = 0.9
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass(frozen=True)
class Gradability:
    """The verdict on one picture.

    Attributes:
        gradable: every check passed.
        reasons: why not, one sentence per failed check (empty when gradable).
        measures: the measured values, by check name ("mean_luma", "saturated_share", "contrast",
            "sharpness", "coverage", "field_size"), for reports and threshold tuning.
    """

    gradable: bool
    reasons: list[str] = field(default_factory=list)
    measures: dict[str, float] = field(default_factory=dict)


def assess_gradability(image: np.ndarray) -> Gradability:
    """Run every pixel check on an RGB fundus photograph.

    Args:
        image: RGB uint8 (H, W, 3).

    Returns:
        Gradability: not gradable, with the reason, when no field of view is found at all.

    Raises:
        ValueError: the image is not a non-empty (H, W, 3) uint8 array.
    """
    check_image(image)
    roi = find_fundus_roi(image)
    if roi is None:
        # no dark surround to tell the field from: burnt out (bright everywhere), or nothing lit at all
        frame_mean = float((image.astype(np.float32) @ _LUMA).mean())
        if frame_mean > MAX_MEAN_LUMA / 2:
            return Gradability(False, [f"overexposed: the whole picture is bright (mean {frame_mean:.0f} of 255) "
                                       "and no field of view stands out"], {"mean_luma": round(frame_mean, 4)})
        return Gradability(False, ["no field of view found: no dark surround sets the retina apart (the picture is "
                                   "blank, too dark, or cropped to fill the frame; grade the camera's original)"],
                           {"mean_luma": round(frame_mean, 4)})
    x0, y0, x1, y1 = roi
    diameter = max(x1 - x0, y1 - y0)
    step = max(1, round(diameter / WORK_DIAMETER))
    luma = _area_mean(image[y0:y1, x0:x1].astype(np.float32) @ _LUMA, step)
    rows, cols = luma.shape
    radius = diameter / 2.0 / step
    # the round field's centre: the box's centre along a full side; along a side the frame cuts, the
    # field continues past the cut edge, so the centre sits half a diameter from the side that is not cut
    centre_x = _centre(x0, x1, image.shape[1], diameter) / step
    centre_y = _centre(y0, y1, image.shape[0], diameter) / step
    yy, xx = np.mgrid[0:rows, 0:cols]
    distance = np.hypot(xx + 0.5 - centre_x, yy + 0.5 - centre_y)
    inner = distance <= _INNER_FRACTION * radius
    if inner.sum() < 64:
        return Gradability(False, ["field of view too small to assess"])
    lit = luma > _lit_threshold(luma)
    field_luma = luma[inner]
    mean = float(field_luma.mean())
    measures = {
        "mean_luma": mean,
        "saturated_share": float((field_luma >= SATURATED_LUMA).mean()),
        "contrast": float(field_luma.std() / max(mean, 1.0)),
        "sharpness": _sharpness(luma, inner, mean),
        # lit pixels inside the full circle over its area (the part beyond the frame counts as missing)
        "coverage": float((lit & (distance <= radius)).sum() / (math.pi * radius * radius)),
        "field_size": diameter / min(image.shape[:2]),
    }
    reasons = []
    if measures["mean_luma"] < MIN_MEAN_LUMA:
        reasons.append(f"underexposed: mean field brightness {mean:.0f} < {MIN_MEAN_LUMA:.0f} of 255")
    if measures["saturated_share"] > MAX_SATURATED_SHARE:
        reasons.append(f"overexposed: {measures['saturated_share']:.0%} of the field is saturated "
                       f"(> {MAX_SATURATED_SHARE:.0%})")
    elif measures["mean_luma"] > MAX_MEAN_LUMA:
        reasons.append(f"overexposed: mean field brightness {mean:.0f} > {MAX_MEAN_LUMA:.0f} of 255 (washed out)")
    if measures["contrast"] < MIN_CONTRAST:
        reasons.append(f"low contrast: {measures['contrast']:.3f} < {MIN_CONTRAST} (haze, flare or a dirty lens)")
    if measures["sharpness"] < MIN_SHARPNESS:
        reasons.append(f"out of focus: sharpness {measures['sharpness']:.4f} < {MIN_SHARPNESS} (defocus or motion)")
    if measures["coverage"] < MIN_COVERAGE:
        reasons.append(f"field not covered: {measures['coverage']:.0%} of the round field is in the picture "
                       f"(< {MIN_COVERAGE:.0%}; off-centre or partly out of the frame)")
    if measures["field_size"] < MIN_FIELD_SIZE:
        reasons.append(f"small field: the lit field spans {measures['field_size']:.0%} of the frame "
                       f"(< {MIN_FIELD_SIZE:.0%}; small pupil or vignetting)")
    return Gradability(not reasons, reasons, {k: round(v, 4) for k, v in measures.items()})


def _area_mean(plane: np.ndarray, step: int) -> np.ndarray:
    """Mean over step x step blocks (the last partial row/column of blocks is dropped)."""
    if step == 1:
        return plane
    rows, cols = plane.shape[0] // step, plane.shape[1] // step
    return plane[: rows * step, : cols * step].reshape(rows, step, cols, step).mean(axis=(1, 3))


def _centre(start: int, end: int, size: int, diameter: int) -> float:
    """Centre of the round field along one axis of the ROI box, relative to the box's start."""
    if end - start >= diameter - 2:  # this side holds the whole diameter
        return (end - start) / 2.0
    touches_start, touches_end = start <= 1, end >= size - 1
    if touches_start and not touches_end:  # cut at the frame's start: the centre is a radius before the end
        return (end - start) - diameter / 2.0
    if touches_end and not touches_start:
        return diameter / 2.0
    return (end - start) / 2.0  # cut on both sides (a wide sensor): symmetric


def _lit_threshold(luma: np.ndarray) -> float:
    """Luma above which a pixel is retina rather than the dark surround (as the ROI finder decides)."""
    return float(np.clip(0.25 * np.percentile(luma, 90), 6.0, 20.0))


def _sharpness(luma: np.ndarray, inner: np.ndarray, mean: float) -> float:
    """Mean absolute 4-neighbour Laplacian inside the field, relative to the mean luma."""
    lap = np.abs(4 * luma[1:-1, 1:-1] - luma[:-2, 1:-1] - luma[2:, 1:-1] - luma[1:-1, :-2] - luma[1:-1, 2:])
    mask = inner[1:-1, 1:-1] & inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]
    return float(lap[mask].mean() / max(mean, 1.0)) if mask.any() else 0.0

"""Which eye a fundus photograph shows, read from the picture, and how that compares with the tag.

Convention (a standard, non-mirrored fundus photograph): the optic disc lies nasal to the macula,
which for a RIGHT eye is the RIGHT side of the picture and for a LEFT eye the left side. In a
macula-centred photograph the disc therefore sits well off the centre of the field of view, on the
eye's nasal side. A disc near the centre (disc-centred photographs, or wide fields where the disc
is close to the centre of a large field) says nothing about the side: the answer is "unknown".

The disc is found as the brightest disc-sized spot relative to its surround, inside the field of
view (numpy only, deterministic). Its confidence combines how far that spot stands out from the
rest of the field with how far off the centre it lies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fundusrt.kernels.roi import auto_threshold, find_fundus_roi

UNKNOWN = "unknown"
# at or above this image confidence a disagreement with the tag is flagged as a mismatch
CONFIDENT = 0.5
# the detector works on the field of view resampled so its long side has this many pixels
_WORK_SIDE = 256
# optic disc radius as a fraction of the field-of-view radius (a 45-degree field: about 0.1-0.14)
_DISC_FRACTION = 0.12
# the surround a disc is compared with: a square this many disc radii across, minus the disc box
_SURROUND_RADII = 3
# pixels this far out (fraction of the radius) are left out: the rim is vignetted and flared
_INNER_FRACTION = 0.92
# horizontal disc offset (fraction of the radius) below which the side is unknown (disc-centred),
# and above which the offset alone is fully convincing; in between the confidence ramps up
_CENTRED_OFFSET, _CLEAR_OFFSET = 0.2, 0.4
# a disc more than this far above or below the centre (fraction of the radius) is not where a
# posterior-pole photograph puts it: the field is not one the side rule covers
_MAX_VERTICAL_OFFSET = 0.5
# weight of the vessel-density term (relative density over the field's mean) added to the contrast
_VESSEL_WEIGHT = 0.1
# contrast of the spot over its surround (relative luminance) at which the detection counts as sure
_SURE_CONTRAST = 0.25


@dataclass(frozen=True)
class ImageLaterality:
    """The eye the picture shows.

    Attributes:
        value: "R", "L" or "unknown".
        confidence: 0-1; 0 for "unknown" answers that have no side at all.
        disc: (x, y) of the detected optic disc in image pixels, None when none was found.
        reason: a short note on how the answer came about.
    """

    value: str
    confidence: float
    disc: tuple[float, float] | None
    reason: str


def image_laterality(image: np.ndarray) -> ImageLaterality:
    """Read the eye from a colour (or red-free) fundus photograph by the optic disc's side.

    Args:
        image: RGB uint8 (H, W, 3).

    Returns:
        ImageLaterality; "unknown" when no field of view or disc stands out, or the disc is near the
        centre (disc-centred or wide field) or far above or below it.

    Raises:
        ValueError: the image is not a non-empty (H, W, 3) uint8 array.
    """
    roi = find_fundus_roi(image)
    # no dark surround at all (a field cropped to fill the frame) leaves the whole frame as the field;
    # a black or blank frame then finds no disc below
    x0, y0, x1, y1 = roi if roi is not None else (0, 0, image.shape[1], image.shape[0])
    # fields cut at the top and bottom keep their full width: the diameter is the long side
    radius = max(x1 - x0, y1 - y0) / 2.0
    step = max(1, round(2.0 * radius / _WORK_SIDE))
    # point samples are enough: every score below averages over disc-sized boxes
    luma = image[y0:y1:step, x0:x1:step].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    rows, cols = luma.shape
    centre_x, centre_y = (x1 - x0) / 2.0 / step - 0.5, (y1 - y0) / 2.0 / step - 0.5
    work_radius = radius / step
    yy, xx = np.mgrid[0:rows, 0:cols]
    # the round field less what is dark in it: a field cut by a straight or slanted edge, or set in a
    # rectangle, leaves black inside the circle, and a disc box must not count that as dim surround
    threshold = auto_threshold(float(np.percentile(luma, 90)))  # field pixels: as the ROI finder's retina
    inside = (np.hypot(xx - centre_x, yy - centre_y) <= _INNER_FRACTION * work_radius) & (luma > threshold)
    inside = _erode(inside, 1)
    if inside.sum() < 100:
        return ImageLaterality(UNKNOWN, 0.0, None, "field of view too small")

    disc_half = max(1, round(_DISC_FRACTION * work_radius))
    weight = inside.astype(np.float32)
    contrast = _spot_contrast(np.where(inside, luma, 0.0), weight, disc_half)
    # the main vessels converge on the disc: the density of thin dark structure (darker than the
    # mean of a small neighbourhood) is highest there, which finds dim discs that brightness misses
    local = _box_sums(np.where(inside, luma, 0.0), 2) / np.maximum(_box_sums(weight, 2), 1.0)
    dark = np.where(inside, np.clip((local - luma) / np.maximum(local, 1.0), 0.0, None), 0.0)
    vessels = _box_sums(dark, disc_half) / np.maximum(_box_sums(weight, disc_half), 1.0)
    vessels = vessels / max(float(vessels[inside].mean()), 1e-6) - 1.0  # relative to the field's mean
    contrast = contrast + _VESSEL_WEIGHT * vessels
    # only spots whose whole disc box lies in the field count: a bright rim flare is not a disc
    candidates = _erode(inside, disc_half) & np.isfinite(contrast)
    if not candidates.any():
        return ImageLaterality(UNKNOWN, 0.0, None, "no disc-sized spot inside the field")
    scores = np.where(candidates, contrast, -np.inf)
    peak_y, peak_x = np.unravel_index(int(np.argmax(scores)), scores.shape)
    peak = float(scores[peak_y, peak_x])
    # a second spot as bright elsewhere (outside two disc radii) makes the detection ambiguous
    far = np.hypot(xx - peak_x, yy - peak_y) > 4 * disc_half
    runner_up = float(scores[far & candidates].max()) if (far & candidates).any() else 0.0
    sure = float(np.clip(peak / _SURE_CONTRAST, 0.0, 1.0))
    distinct = float(np.clip((peak - max(runner_up, 0.0)) / max(peak, 1e-6) * 2.0, 0.0, 1.0))
    detection = sure * distinct

    disc = (float(x0 + peak_x * step), float(y0 + peak_y * step))
    dx = (peak_x - centre_x) / work_radius
    dy = (peak_y - centre_y) / work_radius
    if peak <= 0.0:
        return ImageLaterality(UNKNOWN, 0.0, disc, "no spot brighter than its surround")
    if abs(dy) > _MAX_VERTICAL_OFFSET:
        return ImageLaterality(UNKNOWN, 0.0, disc, f"disc candidate far off the horizontal meridian (dy {dy:+.2f} R)")
    if abs(dx) < _CENTRED_OFFSET:
        return ImageLaterality(UNKNOWN, 0.0, disc, f"disc near the centre (dx {dx:+.2f} R): disc-centred or wide field")
    offset = float(np.clip((abs(dx) - _CENTRED_OFFSET) / (_CLEAR_OFFSET - _CENTRED_OFFSET), 0.0, 1.0))
    value = "R" if dx > 0 else "L"
    confidence = round(detection * offset, 3)
    return ImageLaterality(value, confidence, disc,
                           f"disc {'right' if dx > 0 else 'left'} of centre (dx {dx:+.2f} R, contrast {peak:.2f})")


@dataclass(frozen=True)
class LateralityCheck:
    """The laterality used for an image and where it came from (the JSON report's keys)."""

    laterality: str | None
    laterality_source: str  # "tag" or "image"
    image_laterality: str
    image_laterality_confidence: float
    laterality_mismatch: bool


def check_laterality(tag: str | None, found: ImageLaterality) -> LateralityCheck:
    """Combine the header's laterality with the picture's.

    The tag wins when present (a mismatch is flagged, not silently corrected: the clinician decides);
    without a tag the picture's value is used and marked as derived ("image") when it is confident,
    else the laterality stays None: a guess must not pass for a recorded eye.
    """
    if tag in ("R", "L"):
        mismatch = found.value in ("R", "L") and found.value != tag and found.confidence >= CONFIDENT
        return LateralityCheck(tag, "tag", found.value, found.confidence, mismatch)
    derived = found.value if found.value in ("R", "L") and found.confidence >= CONFIDENT else None
    return LateralityCheck(derived, "image", found.value, found.confidence, False)


def _box_sums(plane: np.ndarray, half: int) -> np.ndarray:
    """Sum over the (2 half + 1)^2 box around every pixel (zero outside), via an integral image."""
    padded = np.pad(plane, half + 1)
    integral = padded.cumsum(0).cumsum(1)
    size = 2 * half + 1
    return (integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size])[
        : plane.shape[0], : plane.shape[1]]


def _spot_contrast(luma: np.ndarray, weight: np.ndarray, half: int) -> np.ndarray:
    """(mean inside a disc box - mean of its surround ring) / surround mean, field pixels only."""
    inner_sum, inner_n = _box_sums(luma, half), _box_sums(weight, half)
    outer = _SURROUND_RADII * half
    ring_sum = _box_sums(luma, outer) - inner_sum
    ring_n = _box_sums(weight, outer) - inner_n
    with np.errstate(divide="ignore", invalid="ignore"):
        inner_mean = inner_sum / inner_n
        ring_mean = ring_sum / ring_n
        contrast = (inner_mean - ring_mean) / np.maximum(ring_mean, 1.0)
    contrast[(inner_n < 1) | (ring_n < 1)] = np.nan
    return contrast


def _erode(mask: np.ndarray, half: int) -> np.ndarray:
    """Pixels whose whole (2 half + 1)^2 box lies inside `mask`."""
    size = (2 * half + 1) ** 2
    return _box_sums(mask.astype(np.float32), half) >= size - 0.5

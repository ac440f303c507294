"""Fundus field-of-view detection: the bounding box of the bright round retina on a dark surround.

Cropping to it before tiling keeps the black corners of a fundus photograph from wasting tiles, and
keeps what camera exports burn in beside the field (an information bar, text, a logo) out of the
tiles. Detection works on a subsampled copy (`subsample`), which the GPU path gathers on the device
and hands to the same `roi_from_sample`, so both paths decide identically.
"""

from __future__ import annotations

import math

import numpy as np

# ITU-R BT.601 luma weights x 1000 (as PIL's convert("L")), in integers so the threshold test is exact
_LUMA_X1000 = np.array([299, 587, 114], dtype=np.int32)
# work on at most this many pixels along the long side: keeps detection a few ms on a 12 MP photo
MAX_SIDE = 1024
# a field of view smaller than this fraction of the image is noise or an overlay, not a retina
_MIN_AREA_FRACTION = 0.01
# above this fraction nothing is dark, so there is no surround to crop
_MAX_AREA_FRACTION = 0.95
# a row/column belongs to a bright run when its count reaches this fraction of the busiest one;
# rejects isolated specks and the thin tips of strokes
_PROFILE_FRACTION = 0.02
# the automatic threshold: this fraction of the 90th luma percentile (a retina fills far more than
# 10% of a fundus photograph), kept within these bounds: 20 is well above a camera's black surround
# in a normal exposure; 6 still clears JPEG ringing and sensor noise in the surround of a dark one
_AUTO_FRACTION = 0.25
_AUTO_MIN, _AUTO_MAX = 6.0, 20.0
# a colour photograph's retina is red-dominant (red the largest channel by this margin) almost
# everywhere; burnt-in white, grey, blue, green or yellow overlays are not. Applied only when at
# least _COLOUR_SHARE of the bright pixels are red-dominant, so red-free and angiography pictures
# (grey) keep the luminance test alone
_RED_MARGIN = 4
_COLOUR_SHARE = 0.5
# alternate row and column refinements until the box stops changing; two rounds settle every case
# the tests draw, the third is a margin
_MAX_ROUNDS = 3


def check_image(image: object) -> np.ndarray:
    """Validate an RGB image: a numpy uint8 array of shape (H, W, 3) with H, W >= 1.

    Raises:
        ValueError: with what was wrong and what is expected.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array of shape (H, W, 3) uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 RGB, got dtype {image.dtype}; convert or rescale it to 0..255 first")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must have shape (H, W, 3) RGB, got {image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image is empty: shape {image.shape}")
    return image


def subsample_step(height: int, width: int) -> int:
    """Stride that brings the long side to at most MAX_SIDE samples."""
    return max(1, math.ceil(max(height, width) / MAX_SIDE))


def find_fundus_roi(image: np.ndarray, threshold: float | None = None) -> tuple[int, int, int, int] | None:
    """Bounding box of the fundus field of view, leaving out overlays burnt in beside it.

    Args:
        image: RGB uint8 array (H, W, 3).
        threshold: luminance (0..255) above which a pixel counts as retina; None picks it from the
            image (lower for a dark exposure, at most 20).

    Returns:
        (x0, y0, x1, y1) in pixels of `image` (exclusive end), or None when there is no field of view
        to crop to: the image is (almost) fully dark, or (almost) fully bright.

    Raises:
        ValueError: the image is not (H, W, 3) uint8 or is empty.
    """
    check_image(image)
    height, width = image.shape[:2]
    step = subsample_step(height, width)
    return roi_from_sample(image[::step, ::step], step, height, width, threshold)


def auto_threshold(luma_p90: float) -> float:
    """The luma (0-255) above which a pixel is retina rather than black surround, from the picture's 90th
    luma percentile."""
    return float(np.clip(_AUTO_FRACTION * luma_p90, _AUTO_MIN, _AUTO_MAX))


def roi_from_sample(
    sample: np.ndarray, step: int, height: int, width: int, threshold: float | None = None
) -> tuple[int, int, int, int] | None:
    """find_fundus_roi on `sample` = image[::step, ::step] of a (height, width) image.

    In a colour photograph only red-dominant pixels count (see _COLOUR_SHARE). The bright mask is eroded (3x3 cross) so single-pixel noise and JPEG ringing drop out. The box is
    then the bright run of rows and of columns with the most retina in it, each counted only inside
    the other's run, alternately until it settles: a bar, text or a logo separated from the field by
    any dark gap forms a run of its own and loses to the field, even when it is brighter or spans the
    whole width (a row count over all columns would let a bottom bar claim every column).
    """
    luma = sample.astype(np.int32) @ _LUMA_X1000
    if threshold is None:
        threshold = auto_threshold(np.percentile(luma, 90) / 1000.0)
    bright = luma > 1000 * threshold
    channels = sample.astype(np.int16)
    red = channels[..., 0] > np.maximum(channels[..., 1], channels[..., 2]) + _RED_MARGIN
    if bright.any() and float(red[bright].mean()) >= _COLOUR_SHARE:
        bright &= red
    core = bright.copy()
    core[1:, :] &= bright[:-1, :]
    core[:-1, :] &= bright[1:, :]
    core[:, 1:] &= bright[:, :-1]
    core[:, :-1] &= bright[:, 1:]
    fraction = float(core.mean())
    if fraction < _MIN_AREA_FRACTION or fraction > _MAX_AREA_FRACTION:
        return None
    rows = (0, core.shape[0] - 1)
    cols = (0, core.shape[1] - 1)
    for _ in range(_MAX_ROUNDS):
        new_rows = _best_run(core[:, cols[0] : cols[1] + 1].sum(axis=1))
        new_cols = _best_run(core[new_rows[0] : new_rows[1] + 1, :].sum(axis=0))
        if (new_rows, new_cols) == (rows, cols):
            break
        rows, cols = new_rows, new_cols
    # undo the one-pixel erosion, then map the first/last bright samples back to full-resolution
    # pixels (the box can be up to step - 1 pixels tight on each side)
    x0 = max(0, (cols[0] - 1) * step)
    x1 = min(width, (cols[1] + 1) * step + 1)
    y0 = max(0, (rows[0] - 1) * step)
    y1 = min(height, (rows[1] + 1) * step + 1)
    return x0, y0, x1, y1


def _best_run(profile: np.ndarray) -> tuple[int, int]:
    """First and last index (inclusive) of the contiguous run of busy entries with the largest total."""
    needed = max(1, int(_PROFILE_FRACTION * int(profile.max())))
    busy = np.concatenate(([False], profile >= needed, [False]))
    edges = np.flatnonzero(busy[1:] != busy[:-1])
    starts, ends = edges[0::2], edges[1::2]  # run i covers starts[i] .. ends[i] - 1
    cumulative = np.concatenate(([0], np.cumsum(profile, dtype=np.int64)))
    best = int(np.argmax(cumulative[ends] - cumulative[starts]))
    return int(starts[best]), int(ends[best] - 1)

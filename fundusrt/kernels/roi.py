"""Fundus field-of-view detection: the bounding box of the bright circular retina on a dark surround.

Cropping to it before tiling keeps the black corners of a fundus photograph from wasting tiles.
"""

from __future__ import annotations

import math

import numpy as np

# ITU-R BT.601 luma weights x 1000 (as PIL's convert("L")), in integers so the threshold test is exact
# and the CUDA reduction (kernels/cuda) decides ties identically
_LUMA_X1000 = np.array([299, 587, 114], dtype=np.int32)
# work on at most this many pixels along the long side: keeps detection a few ms on a 12 MP photo
MAX_SIDE = 1024
# a field of view smaller than this fraction of the image is noise or an overlay, not a retina
_MIN_AREA_FRACTION = 0.01
# above this fraction nothing is dark, so there is no surround to crop
_MAX_AREA_FRACTION = 0.95
# a row/column belongs to the field of view when its bright count reaches this fraction of the
# busiest row/column; rejects thin overlays such as burnt-in text in the corners
_PROFILE_FRACTION = 0.02


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


def find_fundus_roi(image: np.ndarray, threshold: float = 20.0) -> tuple[int, int, int, int] | None:
    """Bounding box of the fundus field of view.

    Thresholds luminance on a subsampled copy, removes isolated noise with a small erosion, and keeps
    rows and columns with enough bright pixels.

    Args:
        image: RGB uint8 array (H, W, 3).
        threshold: luminance (0..255) above which a pixel counts as retina.

    Returns:
        (x0, y0, x1, y1) in pixels of `image` (exclusive end), or None when there is no field of view
        to crop to: the image is (almost) fully dark, or (almost) fully bright.

    Raises:
        ValueError: the image is not (H, W, 3) uint8 or is empty.
    """
    check_image(image)
    height, width = image.shape[:2]
    step = max(1, math.ceil(max(height, width) / MAX_SIDE))
    small = image[::step, ::step]
    bright = (small.astype(np.int32) @ _LUMA_X1000) > 1000 * threshold
    # 3x3 cross erosion: a pixel stays bright only with its four neighbours, which single-pixel sensor
    # noise and JPEG ringing in the surround never have
    core = bright.copy()
    core[1:, :] &= bright[:-1, :]
    core[:-1, :] &= bright[1:, :]
    core[:, 1:] &= bright[:, :-1]
    core[:, :-1] &= bright[:, 1:]
    fraction = float(core.mean())
    if fraction < _MIN_AREA_FRACTION or fraction > _MAX_AREA_FRACTION:
        return None
    cols = _extent(core.sum(axis=0))
    rows = _extent(core.sum(axis=1))
    # undo the one-pixel erosion, then map the first/last bright samples back to full-resolution
    # pixels (the box can be up to step - 1 pixels tight on each side)
    x0 = max(0, (cols[0] - 1) * step)
    x1 = min(width, (cols[1] + 1) * step + 1)
    y0 = max(0, (rows[0] - 1) * step)
    y1 = min(height, (rows[1] + 1) * step + 1)
    return x0, y0, x1, y1


def _extent(profile: np.ndarray) -> tuple[int, int]:
    """First and last index (inclusive) whose count reaches the profile threshold."""
    needed = max(1, int(_PROFILE_FRACTION * int(profile.max())))
    inside = np.flatnonzero(profile >= needed)
    return int(inside[0]), int(inside[-1])

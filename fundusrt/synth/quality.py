"""Ungradable variants of synthetic photographs, with the defect as ground truth, to measure the gradability gate.

Each defect is what makes real screening photographs ungradable, drawn with a severity a grader would
reject: underexposure (small pupil, flash too weak), overexposure, defocus, heavy vignetting (a
small pupil darkens the periphery) and a field pushed off-centre so that much of it is outside the
frame. Screening programmes report 5-20% ungradable photographs; `defect_for` draws one at
UNGRADABLE_RATE, the defects equally likely.
"""

from __future__ import annotations

import numpy as np

DEFECTS = ("underexposed", "overexposed", "defocused", "vignetted", "off_centre")
UNGRADABLE_RATE = 0.15


def defect_for(seed: int) -> str | None:
    """The defect case `seed` carries (None for most: a gradable photograph), drawn at UNGRADABLE_RATE."""
    rng = np.random.default_rng([seed, 23])
    return str(rng.choice(DEFECTS)) if rng.random() < UNGRADABLE_RATE else None


def apply_defect(image: np.ndarray, defect: str, seed: int = 0) -> np.ndarray:
    """`image` (RGB uint8) with `defect` applied; the severity varies with `seed` within an ungradable range."""
    if defect not in DEFECTS:
        raise ValueError(f"unknown defect {defect!r}; choose one of {DEFECTS}")
    rng = np.random.default_rng([seed, 29])
    pixels = image.astype(np.float32)
    height, width = image.shape[:2]
    if defect == "underexposed":
        pixels *= rng.uniform(0.08, 0.2)
    elif defect == "overexposed":
        pixels = pixels * rng.uniform(3.0, 4.5) + 40.0
    elif defect == "defocused":
        from PIL import Image, ImageFilter

        sigma = rng.uniform(0.006, 0.012) * max(height, width)  # a few vessel widths
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(sigma)))
    elif defect == "vignetted":
        yy, xx = np.mgrid[0:height, 0:width]
        radius = np.hypot(yy - height / 2, xx - width / 2) / (min(height, width) / 2)
        # a small pupil: light only in the central third of the field, falling to near black by half the radius
        inner = rng.uniform(0.25, 0.35)
        pixels *= np.clip(1.0 - (radius - inner) / 0.15, 0.02, 1.0)[..., None]
    else:  # off_centre: the field slides sideways until more than half of it is outside the frame
        shift = int(rng.uniform(0.55, 0.7) * width) * (1 if rng.random() < 0.5 else -1)
        moved = np.zeros_like(pixels)
        if shift > 0:
            moved[:, shift:] = pixels[:, : width - shift]
        else:
            moved[:, : width + shift] = pixels[:, -shift:]
        pixels = moved
    return np.clip(pixels, 0, 255).astype(np.uint8)

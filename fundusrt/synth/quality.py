"""Ungradable variants of synthetic photographs, with the defect as ground truth, to measure the gradability gate.

Each defect is what makes real screening photographs ungradable, drawn with a severity a grader would
reject: underexposure (small pupil, flash too weak), overexposure, defocus, heavy vignetting (a
small pupil darkens the periphery), a field pushed off-centre so that much of it is outside the
frame, and an eyelid with its lashes hanging into the field (an artefact that hides the upper arcade
while exposure, contrast, focus and field size stay normal: the pixel checks of
`fundusrt.dicom.gradability` pass most of these, so only a model's gradability item can catch them).
Screening programmes report 5-20% ungradable photographs; `defect_for` draws one at UNGRADABLE_RATE,
the defects equally likely.
"""

from __future__ import annotations

import numpy as np

DEFECTS = ("underexposed", "overexposed", "defocused", "vignetted", "off_centre", "eyelid")
UNGRADABLE_RATE = 0.15


def defect_for(seed: int, rate: float = UNGRADABLE_RATE) -> str | None:
    """The defect case `seed` carries (None for most: a gradable photograph), drawn at `rate`."""
    rng = np.random.default_rng([seed, 23])
    return str(rng.choice(DEFECTS)) if rng.random() < rate else None


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
    elif defect == "eyelid":
        return _eyelid(image, rng)
    else:  # off_centre: the field slides sideways until more than half of it is outside the frame
        shift = int(rng.uniform(0.55, 0.7) * width) * (1 if rng.random() < 0.5 else -1)
        moved = np.zeros_like(pixels)
        if shift > 0:
            moved[:, shift:] = pixels[:, : width - shift]
        else:
            moved[:, : width + shift] = pixels[:, -shift:]
        pixels = moved
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _eyelid(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An upper eyelid over the top 35-50% of the frame: a dim, wavy-edged shadow and blurred lashes at its rim."""
    from PIL import Image, ImageDraw, ImageFilter

    height, width = image.shape[:2]
    xs = np.arange(width, dtype=np.float32)
    rim = height * (rng.uniform(0.35, 0.5) + 0.04 * np.sin(xs / width * rng.uniform(2.0, 4.0) + rng.uniform(0, 6.3)))
    yy = np.arange(height, dtype=np.float32)[:, None]
    # the lid lets through only a dim glow, fading over a few percent of the height at its rim
    floor = rng.uniform(0.25, 0.4)
    shade = floor + (1 - floor) / (1 + np.exp((rim[None, :] - yy) / (0.015 * height)))
    # lashes are far out of the camera's focus: soft dark streaks hanging from the rim
    lashes = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(lashes)
    for x in rng.uniform(0, width, int(rng.integers(25, 45))):
        top = float(rim[int(x)]) - 0.02 * height
        length, lean = rng.uniform(0.06, 0.14) * height, rng.uniform(-0.05, 0.05) * height
        draw.line([(x + lean * t * t, top + length * t) for t in np.linspace(0, 1, 6)], fill=230,
                  width=max(1, round(0.008 * width)))
    lashes = lashes.filter(ImageFilter.GaussianBlur(0.004 * width))
    shade = shade * (1 - np.asarray(lashes, np.float32) / 255)
    return np.clip(image.astype(np.float32) * shade[..., None], 0, 255).astype(np.uint8)

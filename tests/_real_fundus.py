"""Real fundus photographs for tests, and the camera-export defects the tests draw onto them.

tests/data/fundus_left_skimage.jpg is scikit-image's `data.retina()` (Häggström, Wikimedia Commons
"Fundus photograph of normal left eye", CC0 1.0), downscaled to 1024x1024; see tests/data/README.md.
It is a macula-centred photograph of a LEFT eye: the optic disc is on the left of the picture. Its
mirror image stands in for a right eye (a derived test case, not a second photograph).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DATA = Path(__file__).parent / "data"
LEFT_EYE_PHOTO = DATA / "fundus_left_skimage.jpg"
# the photograph's field of view, measured once on the 1024 px copy as the bounding box of luma > 20
# (x0, y0, x1, y1), exclusive end: the round field nearly touches all four sides
FIELD_BOX = (6, 5, 1016, 1016)


@functools.lru_cache(maxsize=None)
def left_eye() -> np.ndarray:
    """The real photograph of a left eye, RGB uint8 (1024, 1024, 3), read-only."""
    image = np.asarray(Image.open(LEFT_EYE_PHOTO).convert("RGB"))
    image.flags.writeable = False
    return image


def right_eye() -> np.ndarray:
    """The left-eye photograph mirrored left-right: the disc moves to the right, as in a right eye."""
    return np.ascontiguousarray(left_eye()[:, ::-1])


def on_canvas(photo: np.ndarray, width: int, height: int, x: int, y: int) -> np.ndarray:
    """`photo` pasted at (x, y) on a black canvas, as cameras export a round field in a wide frame."""
    canvas = np.zeros((height, width, 3), np.uint8)
    canvas[y : y + photo.shape[0], x : x + photo.shape[1]] = photo
    return canvas


def draw_text(image: np.ndarray, xy: tuple[int, int], text: str, size: int, fill=(255, 255, 255)) -> np.ndarray:
    """A copy of `image` with `text` burnt in at `xy` (top-left), in Pillow's built-in font."""
    picture = Image.fromarray(image)
    ImageDraw.Draw(picture).text(xy, text, fill=fill, font=ImageFont.load_default(size=size))
    return np.asarray(picture).copy()

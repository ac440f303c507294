"""Shared helpers for the DICOM writer/reader tests (plain functions, no pytest magic)."""

from __future__ import annotations

import functools
import itertools
import warnings
from pathlib import Path

import numpy as np
import pydicom

from fundusrt.synth.dicom_writer import TRANSFER_SYNTAXES, VARIANTS, write_op_image

LOSSLESS = ("j2k-lossless-rct", "rle", "explicit-le")
COMBINATIONS = list(itertools.product(VARIANTS, TRANSFER_SYNTAXES))
# pydicom's bundled files live beside the package; get_testdata_files() would try to download more.
PYDICOM_TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
PHI_NAME = "SENTINEL^PATIENTNAME"
PHI_ID = "SENTINEL-ID-4711"


@functools.lru_cache(maxsize=None)
def fundus_picture(width: int = 256, height: int = 256, seed: int = 1) -> np.ndarray:
    """A synthetic fundus photograph (read-only, cached: drawing takes ~0.2 s)."""
    from fundusrt.synth.fundus import draw_fundus, random_case

    image, _ = draw_fundus(random_case(seed, width, height))
    image.flags.writeable = False
    return image


def small_picture(width: int = 40, height: int = 32, seed: int = 0) -> np.ndarray:
    """A tiny smooth RGB picture with noise, for tests that write thousands of files."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 200 / width + 30, ys * 150 / height + 20, (xs + ys) * 60 / (width + height) + 10], -1)
    return np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8)


def stereo(image: np.ndarray, shift: int = 3) -> np.ndarray:
    second = np.zeros_like(image)
    second[:, shift:] = image[:, :-shift]
    return np.stack([image, second])


def expected_frames(image: np.ndarray, variant: str) -> np.ndarray:
    """What the reader should return for `image` written as `variant`: (frames, H, W, 3)."""
    frames = stereo(image) if variant == "op-stereo" else image[None]
    if variant == "op-redfree":
        frames = np.repeat(frames[..., 1:2], 3, axis=3)
    return frames


def write_combination(directory: Path, image: np.ndarray, variant: str, syntax: str, **kwargs) -> Path:
    """Write `image` as (variant, syntax) into `directory` and return the path."""
    pixels = stereo(image) if variant == "op-stereo" else image
    kwargs.setdefault("laterality", "R")
    return write_op_image(directory / f"{variant}_{syntax}.dcm", pixels, variant=variant,
                          transfer_syntax=syntax, **kwargs)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def pydicom_reference(ds: pydicom.Dataset, plugin: str = "") -> np.ndarray:
    """pydicom's own decode (frames first), optionally forcing a decoding plugin."""
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        arr = pixel_array(ds, decoding_plugin=plugin) if plugin else pixel_array(ds)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return arr if frames > 1 else arr[None]

"""Pillow-exact BICUBIC resizing of RGB uint8 images, vectorised (the C extension `_resample`).

The models were trained on Pillow's BICUBIC, so the CPU path reproduces it bit for bit (same double
weights, same 22-bit fixed point, same uint8 intermediate, same pass order) while running the two
passes with SIMD multiply-adds. The GIL is released while it runs, so resizes run concurrently in threads.
"""

from __future__ import annotations

from importlib import metadata

import numpy as np

from fundusrt.kernels import _resample


def installed_pillow_major() -> int:
    """Major version of the installed Pillow, whose pass order the resamplers follow."""
    return int(metadata.version("pillow").split(".")[0])


def pillow_vertical_first(src_w: int, src_h: int, out_w: int, out_h: int, pillow_major: int) -> bool:
    """Whether Pillow `pillow_major` resamples the vertical axis first for src -> out.

    Pillow 13 (python-pillow/Pillow#9549) goes vertical first when the height shrinks by more than
    twice as many pixels as the width; the rule was fitted on Pillow 13.0.0 over 400 random size pairs
    and boundary cases (tests/test_resample.py re-checks it). Earlier Pillow is always horizontal first.
    """
    return pillow_major >= 13 and out_h < src_h and src_h - out_h > 2 * (src_w - out_w)


_PILLOW_MAJOR = installed_pillow_major()


def resize_bicubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 (H, W, 3) image to size = (width, height) exactly as Pillow's BICUBIC does.

    The RGB view of a C-contiguous RGBX buffer (what the JPEG reader returns), and crops of it, are read
    in place; other layouts are made contiguous first.

    Raises:
        ValueError: the image is not a non-empty (H, W, 3) uint8 array, or a size is not positive.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ValueError(f"expected a non-empty (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    out_w, out_h = (int(v) for v in size)
    if out_w <= 0 or out_h <= 0:
        raise ValueError(f"output size must be positive, got {out_w}x{out_h}")
    height, width = image.shape[:2]
    base = image.base
    if (isinstance(base, np.ndarray) and base.dtype == np.uint8 and base.ndim == 3 and base.shape[2] == 4
            and base.flags.c_contiguous and image.strides == (base.strides[0], 4, 1)):
        source, pixel_bytes, row_stride = base, 4, base.strides[0]
        offset = image.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    else:
        source = np.ascontiguousarray(image)
        pixel_bytes, row_stride, offset = 3, width * 3, 0
    out = np.empty((out_h, out_w, 3), dtype=np.uint8)
    vertical_first = pillow_vertical_first(width, height, out_w, out_h, _PILLOW_MAJOR)
    _resample.resize(source, offset, row_stride, pixel_bytes, width, height, out, out_w, out_h, vertical_first)
    return out

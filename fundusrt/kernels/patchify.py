"""CPU patching: an RGB image in, normalised NCHW tiles out, following a TilePlan.

Resampling is Pillow's BICUBIC on uint8 (what the models were trained with), reproduced bit for bit by
fundusrt.kernels.resample and done once per distinct resize target: the whole grid canvas at once, then
tiles are slices of it; distinct targets resize concurrently. Pixels decoded as RGBX (the JPEG path of
fundusrt.dicom) are resampled in place. Normalisation is a per-channel 256-entry lookup table written
straight into the output array, so each output value is touched once.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fundusrt.config import TilingConfig
from fundusrt.kernels.resample import resize_bicubic
from fundusrt.kernels.roi import check_image, find_fundus_roi
from fundusrt.kernels.tiling import TilePlan, TileSource, plan_tiles

if TYPE_CHECKING:
    from fundusrt.kernels.cuda_patchify import CudaPatches

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


@dataclass
class Patches:
    """Tiles ready for the vision tower.

    Attributes:
        pixel_values: (num_tiles, 3, tile_size, tile_size) normalised pixels, float32 or float16.
        plan: the geometry that produced them (grid, ROI, per-tile sources).
    """

    pixel_values: np.ndarray
    plan: TilePlan

    @property
    def num_tiles(self) -> int:
        """Number of tiles, the first axis of pixel_values."""
        return int(self.pixel_values.shape[0])


def normalisation_lut(mean: tuple[float, ...], std: tuple[float, ...], dtype: np.dtype) -> np.ndarray:
    """(3, 256) table: lut[c, v] = (v / 255 - mean[c]) / std[c], computed in float64 then cast once."""
    values = np.arange(256, dtype=np.float64) / 255.0
    table = (values[None, :] - np.asarray(mean, dtype=np.float64)[:, None]) / np.asarray(std, dtype=np.float64)[:, None]
    return table.astype(dtype)


def patchify(
    image: np.ndarray, cfg: TilingConfig, *, dtype: type | np.dtype = np.float32, device: str = "cpu"
) -> Patches | CudaPatches:
    """Turn an RGB image into normalised tiles under a tiling policy.

    Args:
        image: RGB uint8 array (H, W, 3).
        cfg: tiling policy, tile size, mean/std and whether to crop to the fundus field of view first.
        dtype: np.float32 or np.float16 for pixel_values.
        device: "cpu" (our SIMD resampler + NumPy) or "cuda" (our kernels; the result stays in device memory as
            CudaPatches, which the GPU backends consume without a host round trip).

    Returns:
        Patches with pixel_values (N, 3, S, S) and the TilePlan (plan.roi records the crop, if any),
        or CudaPatches for device="cuda".

    Raises:
        ValueError: the image is not a non-empty (H, W, 3) uint8 array, dtype or device is unsupported.
    """
    if device == "cuda":
        from fundusrt.kernels.cuda_patchify import patchify_cuda

        return patchify_cuda(image, cfg, dtype=dtype)
    if device != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    check_image(image)
    out_dtype = np.dtype(dtype)
    if out_dtype not in _DTYPES:
        raise ValueError(f"dtype must be float32 or float16, got {out_dtype}")
    plan = plan_image(image, cfg)
    if plan.roi is not None:
        x0, y0, x1, y1 = plan.roi
        image = image[y0:y1, x0:x1]
    lut = normalisation_lut(cfg.mean, cfg.std, out_dtype)
    size = plan.tile_size
    out = np.empty((plan.num_tiles, 3, size, size), dtype=out_dtype)
    # largest target first so the longest resize starts first
    targets = sorted({tile.resize_to for tile in plan.tiles}, key=lambda wh: wh[0] * wh[1], reverse=True)
    workers = min(len(targets), os.cpu_count() or 1)
    if workers == 1:
        resized = {target: _resize(image, target) for target in targets}
        for index, tile in enumerate(plan.tiles):
            _write_tile(out[index], resized[tile.resize_to], tile, lut, plan.pad_value)
        return Patches(pixel_values=out, plan=plan)
    # the resampler releases the GIL, so the grid canvas and the thumbnail / global view resize
    # concurrently, and tiles are normalised as soon as their source is ready
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = {target: pool.submit(_resize, image, target) for target in targets}
        for index, tile in enumerate(plan.tiles):
            _write_tile(out[index], pending[tile.resize_to].result(), tile, lut, plan.pad_value)
    return Patches(pixel_values=out, plan=plan)


def plan_image(image: np.ndarray, cfg: TilingConfig) -> TilePlan:
    """The TilePlan patchify follows for `image`: the fundus ROI (when cfg.roi_crop) and the tiling of it."""
    height, width = check_image(image).shape[:2]
    return plan_tiles(width, height, cfg, roi=find_fundus_roi(image) if cfg.roi_crop else None)


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[1::-1] == size:
        return image
    return resize_bicubic(image, size)


def _write_tile(
    out: np.ndarray,
    resized: np.ndarray,
    tile: TileSource,
    lut: np.ndarray,
    pad_value: tuple[int, int, int],
) -> None:
    """Fill one (3, S, S) output tile from the resized image pasted on the canvas."""
    bx0, by0, bx1, by1 = tile.box
    px, py = tile.paste_at
    rh, rw = resized.shape[:2]
    # overlap of the tile box with the pasted image, in canvas coordinates
    ix0, iy0 = max(bx0, px), max(by0, py)
    ix1, iy1 = min(bx1, px + rw), min(by1, py + rh)
    covered = ix0 < ix1 and iy0 < iy1
    if not covered or (ix0, iy0, ix1, iy1) != (bx0, by0, bx1, by1):
        for channel in range(3):
            out[channel].fill(lut[channel, pad_value[channel]])
    if not covered:
        return
    src = resized[iy0 - py : iy1 - py, ix0 - px : ix1 - px]
    # uint8 indices are always in range; mode="clip" only skips numpy's buffered bounds check
    dst = out[:, iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0]
    for channel in range(3):
        np.take(lut[channel], src[:, :, channel], out=dst[channel], mode="clip")

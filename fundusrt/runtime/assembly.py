"""Image-feature assembly after the connector: how one image's tile features become prompt tokens.

"flat" concatenates tiles in order. "anyres_unpad" is LLaVA-NeXT's `spatial_unpad` (shared reference
2.4 / 4.5): the global view's tokens, then the grid tiles' feature map in image layout with the
padding rows or columns cropped away, optionally shrunk bilinearly (LLaVA-OneVision "anyres_max_N"),
with the learned `image_newline` vector appended to every row.

The newline vector travels in the package as `image_newline.npy` (float32, (hidden,)), named by
`manifest.extra["image_newline"]` and hashed as a data file of the connector component.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from fundusrt.kernels.tiling import TilePlan
from fundusrt.manifest import Manifest, PackageError

IMAGE_NEWLINE_KEY = "image_newline"
ANYRES_MAX_KEY = "anyres_max_tiles"


def unpad_bounds(map_height: int, map_width: int, width: int, height: int) -> tuple[int, int, int, int]:
    """LLaVA `unpad_image`: (row0, row1, col0, col1) of a (map_height, map_width) feature map that
    cover the `width` x `height` source once the anyres centre padding is removed.

    The original repositories truncate with int(); an odd leftover keeps one extra row or column.
    """
    if width / height > map_width / map_height:
        new_height = int(height * (map_width / width))
        pad = (map_height - new_height) // 2
        return pad, map_height - pad, 0, map_width
    new_width = int(width * (map_height / height))
    pad = (map_width - new_width) // 2
    return 0, map_height, pad, map_width - pad


def shrunk_size(height: int, width: int, side: int, max_tiles: int) -> tuple[int, int] | None:
    """LLaVA-OneVision anyres_max_N: the (height, width) to shrink an unpadded map to, or None to keep it."""
    if max_tiles <= 0:
        return None
    ratio = math.sqrt(height * width / (max_tiles * side**2))
    if ratio <= 1.1:
        return None
    return int(height // ratio), int(width // ratio)


def _bilinear_axis(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=False) indexing
    src = np.maximum((np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5, 0.0)
    lo = src.astype(np.int64)
    hi = np.minimum(lo + 1, size_in - 1)
    return lo, hi, (src - lo)[:, None]


def bilinear_resize(feature_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) -> (height, width, C) with torch's bilinear (align_corners=False) sampling."""
    r0, r1, wr = _bilinear_axis(feature_map.shape[0], height)
    c0, c1, wc = _bilinear_axis(feature_map.shape[1], width)
    rows = feature_map[r0] * (1 - wr[:, :, None]) + feature_map[r1] * wr[:, :, None]
    return (rows[:, c0] * (1 - wc) + rows[:, c1] * wc).astype(feature_map.dtype, copy=False)


def assemble_anyres_unpad(image_embeds: np.ndarray, plan: TilePlan, image_newline: np.ndarray,
                          max_tiles: int = 0) -> np.ndarray:
    """One image's connector output (1 + grid tiles, tokens, hidden) -> its prompt tokens (n, hidden).

    Args:
        image_embeds: global view first, then grid tiles row-major, as `kernels.plan_tiles` orders them.
        plan: the tiling plan of this image (grid and source size).
        image_newline: (hidden,) appended after every feature row.
        max_tiles: LLaVA-OneVision anyres_max_N (0: no shrinking).
    """
    cols, rows = plan.grid
    n_tiles, tokens, hidden = image_embeds.shape
    side = math.isqrt(tokens)
    if side * side != tokens or n_tiles != 1 + cols * rows:
        raise ValueError(f"anyres assembly needs 1 + {cols}x{rows} tiles of a square token grid, got {n_tiles} "
                         f"tiles of {tokens} tokens")
    grid = image_embeds[1:].reshape(rows, cols, side, side, hidden).transpose(0, 2, 1, 3, 4)
    feature_map = grid.reshape(rows * side, cols * side, hidden)
    r0, r1, c0, c1 = unpad_bounds(rows * side, cols * side, *plan.source_size)
    feature_map = feature_map[r0:r1, c0:c1]
    target = shrunk_size(feature_map.shape[0], feature_map.shape[1], side, max_tiles)
    if target is not None:
        feature_map = bilinear_resize(feature_map, *target)
    newline = np.broadcast_to(image_newline.astype(feature_map.dtype), (feature_map.shape[0], 1, hidden))
    with_newlines = np.concatenate([feature_map, newline], axis=1).reshape(-1, hidden)
    return np.concatenate([image_embeds[0], with_newlines], axis=0)


def load_image_newline(package_dir: Path, manifest: Manifest) -> np.ndarray | None:
    """The package's image_newline vector, or None when its layout does not use one."""
    if manifest.prompt.image_layout != "anyres_unpad":
        return None
    name = manifest.extra.get(IMAGE_NEWLINE_KEY)
    if not name:
        raise PackageError("the package uses the anyres_unpad image layout but its manifest names no "
                           f"extra.{IMAGE_NEWLINE_KEY} file; re-export it with this fundusrt")
    try:
        newline = np.load(package_dir / name, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise PackageError(f"cannot read the package's image_newline file {name}: {exc}") from exc
    if newline.shape != (manifest.decoder.hidden_size,):
        raise PackageError(f"{name} has shape {newline.shape}, expected ({manifest.decoder.hidden_size},)")
    return newline.astype(np.float32, copy=False)

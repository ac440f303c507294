"""Tiling policies: pure functions from an image size and a TilingConfig to a TilePlan.

A TilePlan says, for every tile the vision tower consumes, how it is made from the (optionally
ROI-cropped) source image: resize the source to `resize_to` (PIL BICUBIC), paste it at `paste_at` on
a `canvas` filled with `pad_value`, and crop `box`. The NumPy path (`kernels.patchify`) and the CUDA
path execute the same plan, so they cannot disagree on geometry.

Policies (facts: shared reference, sections 4.1-4.4):
- "internvl_dynamic": InternVL / FundusExpert `dynamic_preprocess`.
- "anyres": LLaVA-NeXT `process_anyres_image` (global view first, then padded grid tiles).
- "single": one tile, the source stretched to tile_size x tile_size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from fundusrt.config import TilingConfig

@dataclass(frozen=True)
class TileSource:
    """How one output tile is made from the (ROI-cropped) source image.

    Attributes:
        kind: "grid", "thumbnail" (InternVL whole-image view, last) or "global" (AnyRes base view, first).
        resize_to: (width, height) the source is resized to, with PIL BICUBIC semantics.
        paste_at: (x, y) of the resized image on the canvas ((0, 0) unless AnyRes centre padding).
        canvas: (width, height) of the canvas; outside the pasted image it holds TilePlan.pad_value.
        box: (x0, y0, x1, y1) crop of the canvas giving this tile (a tile_size square).
    """

    kind: str
    resize_to: tuple[int, int]
    paste_at: tuple[int, int]
    canvas: tuple[int, int]
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class TilePlan:
    """Geometry of one image's tiles, in the order the vision tower consumes them.

    Attributes:
        grid: (cols, rows) of the grid tiles (thumbnail / global view not counted).
        tile_size: side of every square tile in pixels.
        tiles: one TileSource per output tile.
        roi: (x0, y0, x1, y1) crop of the original image applied before everything else, or None.
        source_size: (width, height) of the image after the ROI crop.
        pad_value: uint8 RGB fill for canvas areas not covered by the resized image.
    """

    grid: tuple[int, int]
    tile_size: int
    tiles: tuple[TileSource, ...]
    roi: tuple[int, int, int, int] | None
    source_size: tuple[int, int]
    pad_value: tuple[int, int, int]

    @property
    def num_tiles(self) -> int:
        """Number of tiles the vision tower receives (grid tiles plus any thumbnail/global view)."""
        return len(self.tiles)


def _check_size(width: int, height: int) -> None:
    if int(width) != width or int(height) != height or width < 1 or height < 1:
        raise ValueError(f"image size must be positive integers, got width={width}, height={height}")


def internvl_candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_tiles <= cols*rows <= max_tiles, by area then columns ascending.

    This is the order transformers' GotOcr2 processor uses. InternVL's own code sorts a Python set
    by area only, leaving ties in set-iteration order; for every (min, max) the tests check, both
    orders choose the same grid for every image size (see tests/test_tiling.py).
    """
    return [
        (cols, area // cols)
        for area in range(min_tiles, max_tiles + 1)
        for cols in range(1, area + 1)
        if area % cols == 0
    ]


def internvl_grid(width: int, height: int, min_tiles: int, max_tiles: int, tile_size: int) -> tuple[int, int]:
    """InternVL `find_closest_aspect_ratio`: the grid whose cols/rows is closest to width/height.

    Among grids with exactly the same ratio difference a later (larger) grid wins only while the image
    has more than half the pixels of that grid (area > 0.5 * tile_size**2 * cols * rows).

    Returns:
        (cols, rows).
    """
    _check_size(width, height)
    aspect = width / height
    area = width * height
    best_diff = math.inf
    best = (1, 1)
    for cols, rows in internvl_candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * cols * rows:
            best = (cols, rows)
    return best


def anyres_best_resolution(width: int, height: int, pinpoints: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """LLaVA `select_best_resolution` with (width, height) order for the size and the pinpoints.

    Picks the largest effective (downscaled, aspect-preserving) resolution, then the least wasted
    canvas area; the earliest pinpoint wins exact ties.

    Returns:
        (width, height) of the chosen pinpoint.
    """
    _check_size(width, height)
    if not pinpoints:
        raise ValueError("anyres needs at least one grid pinpoint")
    best: tuple[int, int] | None = None
    best_effective = 0
    best_wasted = math.inf
    for cand_w, cand_h in pinpoints:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best_effective, best_wasted, best = effective, wasted, (cand_w, cand_h)
    if best is None:
        raise ValueError(f"no usable anyres pinpoint for a {width}x{height} image among {list(pinpoints)}")
    return best


def anyres_resized_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """LLaVA `resize_and_pad_image` size: aspect-preserving fit into target with ceil, (width, height)."""
    target_w, target_h = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return target_w, min(math.ceil(height * scale_w), target_h)
    return min(math.ceil(width * scale_h), target_w), target_h


def _grid_tiles(cols: int, rows: int, tile: int, resize_to, paste_at, canvas) -> list[TileSource]:
    return [
        TileSource("grid", resize_to, paste_at, canvas, (c * tile, r * tile, (c + 1) * tile, (r + 1) * tile))
        for r in range(rows)
        for c in range(cols)
    ]


def _whole_view(kind: str, tile: int) -> TileSource:
    # the thumbnail / global view squashes the whole source to one tile, aspect ratio not kept
    return TileSource(kind, (tile, tile), (0, 0), (tile, tile), (0, 0, tile, tile))


def plan_tiles(
    width: int,
    height: int,
    cfg: TilingConfig,
    roi: tuple[int, int, int, int] | None = None,
) -> TilePlan:
    """Plan the tiles for an image of `width` x `height` pixels under `cfg`.

    Args:
        width, height: size of the original image.
        cfg: tiling policy, tile size and grid bounds.
        roi: optional (x0, y0, x1, y1) crop applied first; the policy then sees the cropped size.

    Returns:
        The TilePlan, tiles in the order the vision tower consumes them.
    """
    _check_size(width, height)
    if roi is not None:
        x0, y0, x1, y1 = (int(v) for v in roi)
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise ValueError(f"roi {roi} is not a non-empty box inside the {width}x{height} image")
        roi = (x0, y0, x1, y1)
        width, height = x1 - x0, y1 - y0
    tile = cfg.tile_size
    pad_value = (0, 0, 0)

    if cfg.policy == "single":
        tiles = [TileSource("grid", (tile, tile), (0, 0), (tile, tile), (0, 0, tile, tile))]
        grid = (1, 1)
    elif cfg.policy == "internvl_dynamic":
        cols, rows = internvl_grid(width, height, cfg.min_tiles, cfg.max_tiles, tile)
        size = (cols * tile, rows * tile)
        tiles = _grid_tiles(cols, rows, tile, size, (0, 0), size)
        if cfg.use_thumbnail and cols * rows != 1:
            tiles.append(_whole_view("thumbnail", tile))
        grid = (cols, rows)
    elif cfg.policy == "anyres":
        bad = [p for p in cfg.grid_pinpoints if p[0] % tile or p[1] % tile or min(p) <= 0]
        if bad:
            raise ValueError(f"anyres pinpoints must be positive multiples of tile_size {tile}, got {bad}")
        canvas = anyres_best_resolution(width, height, cfg.grid_pinpoints)
        resized = anyres_resized_size(width, height, canvas)
        paste_at = ((canvas[0] - resized[0]) // 2, (canvas[1] - resized[1]) // 2)
        grid = (canvas[0] // tile, canvas[1] // tile)
        tiles = _grid_tiles(grid[0], grid[1], tile, resized, paste_at, canvas)
        if cfg.use_thumbnail:
            tiles.insert(0, _whole_view("global", tile))
    else:  # TilingConfig validates the policy; this guards against a config mutated after creation
        raise ValueError(f"unknown tiling policy {cfg.policy!r}")

    return TilePlan(
        grid=grid,
        tile_size=tile,
        tiles=tuple(tiles),
        roi=roi,
        source_size=(width, height),
        pad_value=pad_value,
    )

"""Launch tables: a TilePlan turned into the int32 arrays the kernels in patchify.cu read.

The field layouts mirror the FRT_* macros of patchify.cu; the host harness (patchify_host.cpp)
checks the per-axis tap count against the C function, and the tests compare whole runs with PIL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fundusrt.kernels.resample import installed_pillow_major, pillow_vertical_first
from fundusrt.kernels.tiling import TilePlan

VIEW_FIELDS = 12  # FRT_VIEW_FIELDS
JOB_FIELDS = 4  # FRT_JOB_FIELDS
TILE_FIELDS = 3  # FRT_TILE_FIELDS
TABLE_HEADER = 2  # FRT_TABLE_HEADER
# CUDA caps gridDim.y and gridDim.z at 65535; source rows and tiles ride on those axes
MAX_GRID_YZ = 65535


@dataclass(frozen=True)
class LaunchTables:
    """Everything the patching kernels need besides the image and the normalisation table.

    Attributes:
        views: int32 (num_views, VIEW_FIELDS): one row per distinct resize of the source.
        jobs: int32 (num_jobs, JOB_FIELDS): one coefficient table per view axis.
        tiles: int32 (num_tiles, TILE_FIELDS): view index and canvas origin of each output tile.
        table_ints: size of the coefficient tables buffer, in int32.
        tmp_bytes: size of the horizontal-pass intermediate buffer, in bytes.
        tile_size: side of every tile.
        pad_rgb: canvas fill packed as r | g << 8 | b << 16.
    """

    views: np.ndarray
    jobs: np.ndarray
    tiles: np.ndarray
    table_ints: int
    tmp_bytes: int
    tile_size: int
    pad_rgb: int

    @property
    def num_tiles(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def max_tmp_width(self) -> int:
        """Widest first-pass intermediate (frt_tmp_width): source width if vertical first, else output width."""
        return int(np.where(self.views[:, 11] == 1, self.views[:, 2], self.views[:, 4]).max())

    @property
    def max_tmp_height(self) -> int:
        """Tallest first-pass intermediate (frt_tmp_height)."""
        return int(np.where(self.views[:, 11] == 1, self.views[:, 5], self.views[:, 3]).max())

    @property
    def max_job_outputs(self) -> int:
        return int(self.jobs[:, 1].max())


def max_taps(in_size: int, out_size: int) -> int:
    """Pillow's ksize (frt_max_taps): most bicubic taps one output pixel uses for in_size -> out_size."""
    return math.ceil(2.0 * max(in_size / out_size, 1.0)) * 2 + 1


def build_launch_tables(
    plan: TilePlan, image_width: int, image_height: int, pillow_major: int | None = None
) -> LaunchTables:
    """Turn `plan` for an image of image_width x image_height into kernel launch tables.

    Args:
        plan: the tile geometry (fundusrt.kernels.tiling.plan_tiles).
        image_width, image_height: size of the full image the plan was made for.
        pillow_major: Pillow major version whose pass order to follow; the installed one by default.

    Raises:
        ValueError: the plan does not fit the image, a tile is not tile_size square, or a size exceeds
            what one launch can address.
    """
    x0, y0, x1, y1 = plan.roi if plan.roi is not None else (0, 0, image_width, image_height)
    if not (0 <= x0 < x1 <= image_width and 0 <= y0 < y1 <= image_height) or (x1 - x0, y1 - y0) != plan.source_size:
        raise ValueError(
            f"plan (roi {plan.roi}, source_size {plan.source_size}) does not fit a {image_width}x{image_height} image"
        )
    src_w, src_h = plan.source_size
    if plan.num_tiles > MAX_GRID_YZ:
        raise ValueError(f"{plan.num_tiles} tiles exceed the CUDA grid limit {MAX_GRID_YZ}")
    size = plan.tile_size
    major = installed_pillow_major() if pillow_major is None else pillow_major
    view_index: dict[tuple[tuple[int, int], tuple[int, int]], int] = {}
    views: list[list[int]] = []
    jobs: list[list[int]] = []
    tiles: list[list[int]] = []
    table_ints = 0
    tmp_bytes = 0
    for tile in plan.tiles:
        bx0, by0, bx1, by1 = tile.box
        if (bx1 - bx0, by1 - by0) != (size, size):
            raise ValueError(f"tile box {tile.box} is not a {size}x{size} square")
        key = (tile.resize_to, tile.paste_at)
        if key not in view_index:
            out_w, out_h = tile.resize_to
            tables = []
            for in_size, out_size in ((src_w, out_w), (src_h, out_h)):
                stride = max_taps(in_size, out_size)
                jobs.append([in_size, out_size, stride, table_ints])
                tables.append(table_ints)
                table_ints += TABLE_HEADER + out_size * (2 + stride)
            vertical_first = pillow_vertical_first(src_w, src_h, out_w, out_h, major)
            view_index[key] = len(views)
            views.append([x0, y0, src_w, src_h, out_w, out_h, *tile.paste_at, *tables, tmp_bytes, int(vertical_first)])
            tmp_bytes += (src_w * out_h if vertical_first else out_w * src_h) * 3
        tiles.append([view_index[key], bx0, by0])
    if max(max(v[3], v[5]) for v in views) > MAX_GRID_YZ:
        raise ValueError(f"an intermediate of more than {MAX_GRID_YZ} rows exceeds the CUDA grid limit")
    if table_ints >= 2**31 or tmp_bytes >= 2**31:
        raise ValueError(f"plan needs {table_ints} table ints / {tmp_bytes} intermediate bytes, over the int32 offsets")
    r, g, b = plan.pad_value
    return LaunchTables(
        views=np.asarray(views, dtype=np.int32).reshape(-1, VIEW_FIELDS),
        jobs=np.asarray(jobs, dtype=np.int32).reshape(-1, JOB_FIELDS),
        tiles=np.asarray(tiles, dtype=np.int32).reshape(-1, TILE_FIELDS),
        table_ints=table_ints,
        tmp_bytes=max(tmp_bytes, 1),
        tile_size=size,
        pad_rgb=int(r) | int(g) << 8 | int(b) << 16,
    )

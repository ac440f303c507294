"""Tiling policies against transformers' own implementations and the reference test vectors.

The transformers comparisons skip on a runtime-only install; the reference vectors and geometry always run.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from fundusrt.config import TilingConfig
from fundusrt.kernels.tiling import (
    anyres_best_resolution,
    anyres_resized_size,
    internvl_grid,
    plan_tiles,
)


@pytest.fixture(scope="module")
def got_ocr2():
    """transformers' InternVL (GOT-OCR2) tiling, the reference for our grid choice."""
    return pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")


@pytest.fixture(scope="module")
def hf_utils():
    """transformers' LLaVA-NeXT AnyRes helpers."""
    return pytest.importorskip("transformers.image_processing_utils")


LLAVA16_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (w, h)
ONEVISION_PINPOINTS = [(384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7)]  # (w, h)


def fundus_expert_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """FundusExpert src/quick_start.py dynamic_preprocess + find_closest_aspect_ratio, restated as written.

    Candidates are a Python set sorted by area only, so equal-area grids come in set-iteration order.
    """
    target_ratios = {
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    }
    target_ratios = sorted(target_ratios, key=lambda x: x[0] * x[1])
    aspect_ratio = width / height
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        ratio_diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best_ratio = ratio
    return best_ratio


def _sizes(count: int, seed: int) -> list[tuple[int, int]]:
    """Random (width, height) pairs plus exact-ratio multiples that exercise the tie rule."""
    rng = random.Random(seed)
    sizes = [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(count)]
    sizes += [(rng.randint(1, 200), rng.randint(1, 200)) for _ in range(count // 4)]
    # exact cols:rows ratios at scales around the 0.5 * tile^2 * i * j area threshold
    sizes += [(c * s, r * s) for c in range(1, 7) for r in range(1, 7) for s in (1, 50, 150, 224, 225, 317, 448)]
    return sizes


@pytest.mark.parametrize("max_tiles", [1, 4, 6, 12])
def test_internvl_grid_matches_transformers_and_fundusexpert(got_ocr2, max_tiles: int) -> None:
    mismatches = []
    for width, height in _sizes(1500, seed=max_tiles):
        ours = internvl_grid(width, height, 1, max_tiles, 448)
        # GotOcr2 takes (height, width) and returns (num_columns, num_rows)
        hf = got_ocr2.get_optimal_tiled_canvas((height, width), (448, 448), 1, max_tiles)
        fe = fundus_expert_grid(width, height, 1, max_tiles, 448)
        if not ours == tuple(hf) == fe:
            mismatches.append(((width, height), ours, hf, fe))
    assert not mismatches, f"{len(mismatches)} grid mismatches (size, ours, transformers, FundusExpert): {mismatches[:5]}"


def test_internvl_grid_min_tiles_matches_transformers(got_ocr2) -> None:
    for width, height in _sizes(400, seed=99):
        for min_tiles, max_tiles in ((2, 6), (3, 12)):
            ours = internvl_grid(width, height, min_tiles, max_tiles, 384)
            hf = got_ocr2.get_optimal_tiled_canvas((height, width), (384, 384), min_tiles, max_tiles)
            fe = fundus_expert_grid(width, height, min_tiles, max_tiles, 384)
            assert ours == tuple(hf) == fe, f"{width}x{height} min {min_tiles}: {ours} {hf} {fe}"


# reference section 4.1: (width, height) -> (grid, tiles incl. thumbnail) for max 12 and max 6
INTERNVL_VECTORS = [
    ((448, 448), ((1, 1), 1), ((1, 1), 1)),
    ((2000, 1500), ((4, 3), 13), ((3, 2), 7)),
    ((1444, 1444), ((3, 3), 10), ((2, 2), 5)),
    ((3000, 2000), ((3, 2), 7), ((3, 2), 7)),
    ((1920, 1080), ((4, 2), 9), ((2, 1), 3)),
    ((800, 600), ((4, 3), 13), ((3, 2), 7)),
]


@pytest.mark.parametrize(("size", "max12", "max6"), INTERNVL_VECTORS)
def test_internvl_reference_vectors(size, max12, max6) -> None:
    for max_tiles, (grid, tiles) in ((12, max12), (6, max6)):
        plan = plan_tiles(*size, TilingConfig(policy="internvl_dynamic", max_tiles=max_tiles))
        assert (plan.grid, plan.num_tiles) == (grid, tiles), f"{size} max {max_tiles}"


@pytest.mark.parametrize(("size", "grid", "tiles"), [((1000, 250), (4, 1), 5), ((500, 1500), (1, 3), 4), ((448, 224), (2, 1), 3)])
def test_internvl_reference_vectors_max12_only(size, grid, tiles) -> None:
    plan = plan_tiles(*size, TilingConfig(policy="internvl_dynamic", max_tiles=12))
    assert (plan.grid, plan.num_tiles) == (grid, tiles)


def test_internvl_plan_geometry() -> None:
    plan = plan_tiles(2000, 1500, TilingConfig(policy="internvl_dynamic", tile_size=448, max_tiles=12))
    cols, rows = plan.grid
    grid_tiles = plan.tiles[:-1]
    assert [t.kind for t in plan.tiles] == ["grid"] * (cols * rows) + ["thumbnail"]
    for k, tile in enumerate(grid_tiles):
        col, row = k % cols, k // cols  # row-major, as dynamic_preprocess
        assert tile.box == (col * 448, row * 448, (col + 1) * 448, (row + 1) * 448)
        assert tile.resize_to == tile.canvas == (448 * cols, 448 * rows)
        assert tile.paste_at == (0, 0)
    assert plan.tiles[-1].resize_to == (448, 448)
    assert plan.source_size == (2000, 1500) and plan.roi is None


def test_internvl_thumbnail_rules() -> None:
    one = plan_tiles(448, 448, TilingConfig(policy="internvl_dynamic"))
    assert one.num_tiles == 1 and one.tiles[0].kind == "grid"
    no_thumb = plan_tiles(2000, 1500, TilingConfig(policy="internvl_dynamic", use_thumbnail=False))
    assert no_thumb.num_tiles == 12 and all(t.kind == "grid" for t in no_thumb.tiles)


@pytest.mark.parametrize("pinpoints", [LLAVA16_PINPOINTS, ONEVISION_PINPOINTS])
def test_anyres_best_resolution_matches_transformers(hf_utils, pinpoints) -> None:
    hf_pinpoints = [(h, w) for w, h in pinpoints]  # transformers uses (height, width)
    mismatches = []
    for width, height in _sizes(1500, seed=len(pinpoints)):
        ours = anyres_best_resolution(width, height, pinpoints)
        hf_h, hf_w = hf_utils.select_best_resolution((height, width), hf_pinpoints)
        if ours != (hf_w, hf_h):
            mismatches.append(((width, height), ours, (hf_w, hf_h)))
    assert not mismatches, f"{len(mismatches)} mismatches (size, ours, transformers (w, h)): {mismatches[:5]}"


# reference section 4.4, LLaVA-1.6 pinpoints with CLIP-336 tiles
ANYRES_VECTORS = [
    ((1024, 768), (672, 672), (2, 2)),
    ((1920, 1080), (672, 672), (2, 2)),
    ((1000, 250), (1008, 336), (3, 1)),
    ((336, 336), (336, 672), (1, 2)),
    ((500, 1500), (336, 1008), (1, 3)),
]


@pytest.mark.parametrize(("size", "best", "grid"), ANYRES_VECTORS)
def test_anyres_reference_vectors(size, best, grid) -> None:
    cfg = TilingConfig(policy="anyres", tile_size=336, grid_pinpoints=LLAVA16_PINPOINTS, mean=(0.5,) * 3, std=(0.5,) * 3)
    plan = plan_tiles(*size, cfg)
    assert anyres_best_resolution(*size, LLAVA16_PINPOINTS) == best
    assert plan.grid == grid
    assert plan.num_tiles == 1 + grid[0] * grid[1]


def test_anyres_resize_and_pad_matches_transformers(hf_utils) -> None:
    for width, height in _sizes(600, seed=7):
        target = anyres_best_resolution(width, height, ONEVISION_PINPOINTS)
        ours = anyres_resized_size(width, height, target)
        # get_patch_output_size reads only the (C, H, W) shape; a broadcast view costs no memory
        shape_only = np.broadcast_to(np.zeros((1, 1, 1), np.uint8), (3, height, width))
        new_h, new_w = hf_utils.get_patch_output_size(shape_only, (target[1], target[0]), "channels_first")
        assert ours == (new_w, new_h), f"{width}x{height} -> {target}"


def test_anyres_plan_geometry() -> None:
    cfg = TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=ONEVISION_PINPOINTS)
    plan = plan_tiles(1000, 250, cfg)
    canvas_w, canvas_h = anyres_best_resolution(1000, 250, ONEVISION_PINPOINTS)
    new_w, new_h = anyres_resized_size(1000, 250, (canvas_w, canvas_h))
    assert plan.tiles[0].kind == "global" and plan.tiles[0].resize_to == (384, 384)
    cols, rows = plan.grid
    assert (cols * 384, rows * 384) == (canvas_w, canvas_h)
    for k, tile in enumerate(plan.tiles[1:]):
        col, row = k % cols, k // cols
        assert tile.kind == "grid" and tile.canvas == (canvas_w, canvas_h) and tile.resize_to == (new_w, new_h)
        assert tile.paste_at == ((canvas_w - new_w) // 2, (canvas_h - new_h) // 2)
        assert tile.box == (col * 384, row * 384, (col + 1) * 384, (row + 1) * 384)
    assert plan.pad_value == (0, 0, 0)


def test_single_policy_is_one_stretched_tile() -> None:
    plan = plan_tiles(4288, 2848, TilingConfig(policy="single", tile_size=384))
    assert plan.grid == (1, 1) and plan.num_tiles == 1
    assert plan.tiles[0].resize_to == (384, 384) and plan.tiles[0].box == (0, 0, 384, 384)


def test_roi_changes_the_source_size() -> None:
    cfg = TilingConfig(policy="internvl_dynamic")
    plan = plan_tiles(4288, 2848, cfg, roi=(700, 0, 3548, 2848))
    assert plan.roi == (700, 0, 3548, 2848) and plan.source_size == (2848, 2848)
    assert plan.grid == internvl_grid(2848, 2848, 1, 12, 448) == (3, 3)


@pytest.mark.parametrize(
    ("width", "height", "roi"),
    [(0, 10, None), (10, -1, None), (100, 100, (0, 0, 0, 10)), (100, 100, (50, 50, 150, 60)), (100, 100, (-1, 0, 10, 10))],
)
def test_bad_sizes_and_rois_raise(width, height, roi) -> None:
    with pytest.raises(ValueError, match="size|roi"):
        plan_tiles(width, height, TilingConfig(), roi=roi)


def test_anyres_pinpoints_must_be_tile_multiples() -> None:
    cfg = TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=[(384, 500)])
    with pytest.raises(ValueError, match="multiples of tile_size"):
        plan_tiles(800, 600, cfg)


def test_every_plan_tile_lies_on_its_canvas() -> None:
    rng = random.Random(3)
    configs = [
        TilingConfig(policy="internvl_dynamic", max_tiles=12),
        TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=ONEVISION_PINPOINTS),
        TilingConfig(policy="single"),
    ]
    for _ in range(300):
        width, height = rng.randint(1, 6000), rng.randint(1, 6000)
        for cfg in configs:
            plan = plan_tiles(width, height, cfg)
            for tile in plan.tiles:
                x0, y0, x1, y1 = tile.box
                assert x1 - x0 == y1 - y0 == cfg.tile_size
                assert 0 <= x0 and 0 <= y0 and x1 <= tile.canvas[0] and y1 <= tile.canvas[1]
                px, py = tile.paste_at
                assert px + tile.resize_to[0] <= tile.canvas[0] and py + tile.resize_to[1] <= tile.canvas[1]
            if cfg.policy == "anyres":  # aspect-preserving fit: the resized image spans one full side
                last = plan.tiles[-1]
                assert last.resize_to[0] == last.canvas[0] or last.resize_to[1] == last.canvas[1]

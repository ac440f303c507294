"""CPU patching and fundus ROI against transformers' PIL image processors and direct PIL restatements.

The transformers comparisons skip on a runtime-only install; the PIL restatements and ROI tests always run.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fundusrt.config import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, TilingConfig
from fundusrt.kernels import find_fundus_roi, patchify


@pytest.fixture(scope="module")
def got_ocr2():
    """transformers' InternVL (GOT-OCR2) PIL image processor module."""
    return pytest.importorskip("transformers.models.got_ocr2.image_processing_pil_got_ocr2")


@pytest.fixture(scope="module")
def llava_next():
    """transformers' LLaVA-NeXT PIL image processor module."""
    return pytest.importorskip("transformers.models.llava_next.image_processing_pil_llava_next")


@pytest.fixture(scope="module")
def llava_ov():
    """transformers' LLaVA-OneVision PIL image processor module."""
    return pytest.importorskip("transformers.models.llava_onevision.image_processing_pil_llava_onevision")


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA16_PINPOINTS = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]  # (w, h)
TOLERANCE = 2 / 255


def textured_image(width: int, height: int, seed: int) -> np.ndarray:
    """Smooth colour gradients plus per-pixel noise: exercises both the filter shape and its edges."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / max(width, 1) * 200, y / max(height, 1) * 180, (x + y) % 97 * 2.0], axis=-1)
    noisy = base + rng.normal(0, 25, size=base.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def max_pixel_diff(ours: np.ndarray, theirs: np.ndarray, std: tuple[float, float, float]) -> float:
    """Largest difference in [0, 1] pixel units (normalised values scaled back by std)."""
    scale = np.asarray(std, dtype=np.float64)[None, :, None, None]
    return float(np.abs((ours.astype(np.float64) - theirs.astype(np.float64)) * scale).max())


@pytest.mark.parametrize("size", [(1000, 750), (640, 480), (500, 1500), (300, 200), (448, 448), (911, 437)])
def test_internvl_matches_gotocr2_pil_processor(got_ocr2, size: tuple[int, int]) -> None:
    image = textured_image(*size, seed=size[0])
    cfg = TilingConfig(policy="internvl_dynamic", tile_size=448, max_tiles=12, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    processor = got_ocr2.GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448},
        crop_to_patches=True,
        min_patches=1,
        max_patches=12,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    reference = processor(images=Image.fromarray(image), return_tensors="np")
    theirs = np.asarray(reference["pixel_values"])
    ours = patchify(image, cfg).pixel_values
    assert ours.shape == theirs.shape, f"tile count/shape: ours {ours.shape}, transformers {theirs.shape}"
    assert int(reference["num_patches"][0]) == ours.shape[0]
    diff = max_pixel_diff(ours, theirs, IMAGENET_STD)
    assert diff <= TOLERANCE, f"{size}: max abs diff {diff * 255:.3f}/255 vs GotOcr2ImageProcessorPil"


def dynamic_preprocess_reference(image: Image.Image, max_num: int, image_size: int) -> np.ndarray:
    """FundusExpert quick_start.py preprocessing restated with PIL and float64 NumPy (no torch)."""
    width, height = image.size
    aspect = width / height
    ratios = sorted(
        {(i, j) for n in range(1, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1) if 1 <= i * j <= max_num},
        key=lambda r: r[0] * r[1],
    )
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            best = ratio
    resized = image.resize((image_size * best[0], image_size * best[1]))  # Pillow default: BICUBIC
    tiles = []
    for k in range(best[0] * best[1]):
        col, row = k % best[0], k // best[0]
        tiles.append(resized.crop((col * image_size, row * image_size, (col + 1) * image_size, (row + 1) * image_size)))
    if len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size)))
    mean = np.asarray(IMAGENET_MEAN)[:, None, None]
    std = np.asarray(IMAGENET_STD)[:, None, None]
    return np.stack([(np.asarray(t, dtype=np.float64).transpose(2, 0, 1) / 255.0 - mean) / std for t in tiles])


@pytest.mark.parametrize("size", [(2000, 1500), (1920, 1080), (700, 333)])
def test_internvl_matches_direct_dynamic_preprocess(size: tuple[int, int]) -> None:
    image = textured_image(*size, seed=7)
    cfg = TilingConfig(policy="internvl_dynamic", tile_size=448, max_tiles=12)
    reference = dynamic_preprocess_reference(Image.fromarray(image), 12, 448)
    ours = patchify(image, cfg).pixel_values
    assert ours.shape == reference.shape
    diff = float(np.abs(ours - reference).max())
    assert diff <= 1e-5, f"{size}: max abs diff {diff} (normalised units) vs dynamic_preprocess restatement"


@pytest.mark.parametrize("size", [(1024, 768), (1000, 250), (336, 336), (500, 1500), (777, 901)])
def test_anyres_matches_llava_next_pil_processor(llava_next, size: tuple[int, int]) -> None:
    image = textured_image(*size, seed=size[1])
    cfg = TilingConfig(policy="anyres", tile_size=336, grid_pinpoints=LLAVA16_PINPOINTS, mean=CLIP_MEAN, std=CLIP_STD)
    processor = llava_next.LlavaNextImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=[[h, w] for w, h in LLAVA16_PINPOINTS],
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    theirs = np.asarray(processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"])[0]
    ours = patchify(image, cfg).pixel_values
    assert ours.shape == theirs.shape, f"tile count/shape: ours {ours.shape}, transformers {theirs.shape}"
    diff = max_pixel_diff(ours, theirs, CLIP_STD)
    assert diff <= TOLERANCE, f"{size}: max abs diff {diff * 255:.3f}/255 vs LlavaNextImageProcessorPil"


@pytest.mark.parametrize("size", [(1300, 700), (400, 1000), (384, 384)])
def test_anyres_matches_llava_onevision_pil_processor(llava_ov, size: tuple[int, int]) -> None:
    image = textured_image(*size, seed=3)
    processor = llava_ov.LlavaOnevisionImageProcessorPil(image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    pinpoints = [(w, h) for h, w in processor.image_grid_pinpoints]  # same order, (w, h)
    cfg = TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=pinpoints, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    theirs = np.asarray(processor(images=Image.fromarray(image), return_tensors="np")["pixel_values"])[0]
    ours = patchify(image, cfg).pixel_values
    assert ours.shape == theirs.shape, f"tile count/shape: ours {ours.shape}, transformers {theirs.shape}"
    diff = max_pixel_diff(ours, theirs, SIGLIP_STD)
    assert diff <= TOLERANCE, f"{size}: max abs diff {diff * 255:.3f}/255 vs LlavaOnevisionImageProcessorPil"


def test_single_policy_is_a_stretched_resize() -> None:
    image = textured_image(500, 300, seed=1)
    cfg = TilingConfig(policy="single", tile_size=224, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    expected = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC), dtype=np.float64)
    expected = ((expected / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
    ours = patchify(image, cfg).pixel_values
    assert ours.shape == (1, 3, 224, 224)
    assert float(np.abs(ours - expected).max()) <= 1e-6


def test_float16_output_matches_float32() -> None:
    image = textured_image(900, 600, seed=5)
    cfg = TilingConfig()
    full = patchify(image, cfg).pixel_values
    half = patchify(image, cfg, dtype=np.float16)
    assert half.pixel_values.dtype == np.float16 and half.num_tiles == full.shape[0]
    assert np.allclose(half.pixel_values.astype(np.float32), full, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- fundus ROI


def fundus_disc(width: int, height: int, center: tuple[float, float], radius: float, seed: int = 0):
    """A vignetted orange-red disc on black, and its exact pixel mask."""
    rng = np.random.default_rng(seed)
    y, x = np.ogrid[0:height, 0:width]
    r2 = ((x - center[0]) ** 2 + (y - center[1]) ** 2).astype(np.float32)
    mask = r2 <= radius**2
    # darker towards the rim, as real fundus vignetting, with a little texture
    shade = (1.0 - 0.55 * r2 / np.float32(radius**2)) * rng.normal(1.0, 0.05, size=(height, width)).astype(np.float32)
    shade[~mask] = 0
    colour = np.array([210.0, 95.0, 45.0], dtype=np.float32)
    return np.clip(shade[..., None] * colour, 0, 255).astype(np.uint8), mask


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def assert_box_close(found, expected, tolerance: int) -> None:
    assert found is not None, f"no ROI found, expected {expected}"
    worst = max(abs(a - b) for a, b in zip(found, expected))
    assert worst <= tolerance, f"ROI {found} vs true {expected}: off by {worst} px (tolerance {tolerance})"


@pytest.mark.parametrize(
    ("width", "height", "center", "radius"),
    [(900, 600, (450, 300), 280), (640, 480, (300, 250), 200), (800, 600, (400, 300), 340)],
)
def test_roi_matches_the_disc(width, height, center, radius) -> None:
    image, mask = fundus_disc(width, height, center, radius)
    assert_box_close(find_fundus_roi(image), mask_box(mask), tolerance=2)


def test_roi_on_a_full_size_photo() -> None:
    image, mask = fundus_disc(4288, 2848, (2144, 1424), 1500)  # clipped at top and bottom, like real cameras
    found = find_fundus_roi(image)
    # subsampled to <= 1024 px: 5 px steps, so the box may be up to one step tight
    assert_box_close(found, mask_box(mask), tolerance=5)
    assert found[1] == 0 and found[3] == 2848


@pytest.mark.parametrize("size", [(1024, 1024), (2000, 1312)])
def test_roi_matches_the_synthetic_fundus_field_of_view(size: tuple[int, int]) -> None:
    synth = pytest.importorskip("fundusrt.synth.fundus")
    width, height = size
    image, truth = synth.draw_fundus(synth.CaseSpec("L", 2, False, 0.4, width, height, seed=4))
    (cx, cy), radius = truth.fov_center, truth.fov_radius
    expected = (max(0, cx - radius), max(0, cy - radius), min(width, cx + radius + 1), min(height, cy + radius + 1))
    assert_box_close(find_fundus_roi(image), tuple(round(v) for v in expected), tolerance=3)


def test_roi_is_robust_to_surround_noise_and_thin_overlays() -> None:
    image, mask = fundus_disc(900, 600, (450, 300), 280, seed=2)
    rng = np.random.default_rng(9)
    noisy = np.clip(image.astype(np.int16) + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
    salt = rng.random(mask.shape) < 0.003
    noisy[salt & ~mask] = 255
    noisy[570:578, 20:160] = 255  # a burnt-in text line in a corner, 8 px high
    assert_box_close(find_fundus_roi(noisy), mask_box(mask), tolerance=3)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((300, 400, 3), np.uint8),
        np.full((300, 400, 3), 255, np.uint8),
        np.full((300, 400, 3), 128, np.uint8),
        np.clip(np.random.default_rng(0).normal(4, 4, (300, 400, 3)), 0, 255).astype(np.uint8),
    ],
    ids=["black", "white", "grey", "dark-noise"],
)
def test_roi_none_without_a_field_of_view(image: np.ndarray) -> None:
    assert find_fundus_roi(image) is None


def test_patchify_roi_crop_records_and_applies_the_box() -> None:
    image, _ = fundus_disc(900, 600, (450, 300), 280)
    cropped_cfg = TilingConfig(roi_crop=True)
    result = patchify(image, cropped_cfg)
    roi = find_fundus_roi(image)
    assert result.plan.roi == roi
    x0, y0, x1, y1 = roi
    assert result.plan.source_size == (x1 - x0, y1 - y0)
    direct = patchify(np.ascontiguousarray(image[y0:y1, x0:x1]), TilingConfig())
    np.testing.assert_array_equal(result.pixel_values, direct.pixel_values)


def test_patchify_roi_crop_falls_back_to_the_whole_blank_image() -> None:
    result = patchify(np.zeros((200, 300, 3), np.uint8), TilingConfig(roi_crop=True))
    assert result.plan.roi is None and result.plan.source_size == (300, 200)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ([[0, 0, 0]], "numpy array"),
        (np.zeros((10, 10, 3), np.float32), "uint8"),
        (np.zeros((10, 10), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((10, 10, 4), np.uint8), r"\(H, W, 3\)"),
        (np.zeros((0, 10, 3), np.uint8), "empty"),
        (np.zeros((10, 0, 3), np.uint8), "empty"),
    ],
)
def test_bad_images_raise_clear_errors(image, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        patchify(image, TilingConfig())
    with pytest.raises(ValueError, match=message):
        find_fundus_roi(image)


def test_bad_dtype_raises() -> None:
    with pytest.raises(ValueError, match="float32 or float16"):
        patchify(np.zeros((10, 10, 3), np.uint8), TilingConfig(), dtype=np.int32)


@pytest.mark.parametrize("roi_crop", [False, True])
def test_rgbx_backed_pixels_patch_identically(roi_crop: bool) -> None:
    """The JPEG reader returns the RGB view of an RGBX buffer; patching it must equal patching a plain copy."""
    from fundusrt.synth.fundus import CaseSpec, draw_fundus

    picture, _ = draw_fundus(CaseSpec("L", 2, True, 0.5, 1200, 800, seed=5))
    rgbx = np.zeros((801, 1200, 4), np.uint8)  # with the spare row the JPEG decoder leaves
    rgbx[:800, :, :3] = picture
    view = rgbx[:800, :, :3]
    cfg = TilingConfig(policy="internvl_dynamic", tile_size=448, max_tiles=6, roi_crop=roi_crop)
    np.testing.assert_array_equal(patchify(view, cfg).pixel_values, patchify(picture, cfg).pixel_values)

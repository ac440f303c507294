"""The vectorised CPU resampler against Pillow's own BICUBIC, bit for bit."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fundusrt.kernels
from fundusrt.kernels import _resample
from fundusrt.kernels.resample import installed_pillow_major, pillow_vertical_first, resize_bicubic


def pillow(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, Image.Resampling.BICUBIC))


def rgbx_view(image: np.ndarray, spare_rows: int = 0) -> np.ndarray:
    """The RGB view of an RGBX copy of `image`, as the JPEG reader returns pixels."""
    height, width = image.shape[:2]
    rgbx = np.full((height + spare_rows, width, 4), 77, np.uint8)
    rgbx[:height, :, :3] = image
    return rgbx[:height, :, :3]


def portable(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The loops machines without AVX2 run, on a contiguous RGB copy."""
    source = np.ascontiguousarray(image)
    height, width = source.shape[:2]
    out = np.empty((size[1], size[0], 3), np.uint8)
    vertical_first = pillow_vertical_first(width, height, *size, installed_pillow_major())
    _resample.resize(source, 0, width * 3, 3, width, height, out, *size, vertical_first, True)
    return out


def test_random_sizes_match_pillow_exactly_in_every_layout() -> None:
    rng = np.random.default_rng(0)
    for _ in range(150):
        w, h, ow, oh = (int(v) for v in rng.integers(1, 260, 4))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        expected = pillow(image, (ow, oh))
        layouts = {
            "rgb": image,
            "rgbx": rgbx_view(image),
            "strided": image[:, ::-1][:, ::-1],
            "portable": image,
        }
        for name, source in layouts.items():
            ours = portable(source, (ow, oh)) if name == "portable" else resize_bicubic(source, (ow, oh))
            assert np.array_equal(ours, expected), f"{name}: {w}x{h} -> {ow}x{oh} differs from Pillow"


@pytest.mark.parametrize("size", [(1344, 896), (448, 448), (1152, 768), (2304, 1536), (3000, 900), (900, 2000)])
def test_fundus_sized_image_matches_pillow_exactly(size: tuple[int, int]) -> None:
    """Large downscales (up to 39 taps) and upscales, both pass orders, both input layouts."""
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (1424, 2144, 3), dtype=np.uint8)
    image[::7] = 255  # hard edges push the bicubic overshoot into the clamp
    expected = pillow(image, size)
    assert np.array_equal(resize_bicubic(image, size), expected)
    assert np.array_equal(resize_bicubic(rgbx_view(image), size), expected)


@pytest.mark.parametrize("spare_rows", [0, 1])
def test_crops_of_an_rgbx_buffer_are_read_in_place_and_exactly(spare_rows: int) -> None:
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (600, 800, 3), dtype=np.uint8)
    view = rgbx_view(image, spare_rows)
    for y0, y1, x0, x1 in [(10, 500, 20, 700), (0, 600, 5, 800), (599, 600, 799, 800), (100, 600, 0, 3)]:
        crop = view[y0:y1, x0:x1]
        assert np.array_equal(resize_bicubic(crop, (97, 61)), pillow(image[y0:y1, x0:x1], (97, 61)))
    tracemalloc.start()
    try:
        resize_bicubic(view[5:595, 5:795], (64, 48))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < image.nbytes // 10, f"the RGBX view was copied ({peak} bytes allocated)"


def test_concurrent_resizes_give_the_same_pixels() -> None:
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (400 + 37 * i, 700 - 41 * i, 3), dtype=np.uint8) for i in range(6)]
    expected = [pillow(image, (123, 89)) for image in images]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda image: resize_bicubic(image, (123, 89)), images * 3))
    for index, result in enumerate(results):
        assert np.array_equal(result, expected[index % len(images)])


def test_pillow_pass_order_rule_matches_installed_pillow() -> None:
    """The rule both resamplers (CPU and CUDA) use to pick the first pass predicts what this Pillow does."""
    rng = np.random.default_rng(7)
    major = installed_pillow_major()
    checked = 0
    for _ in range(80):
        w, h = (int(v) for v in rng.integers(8, 160, 2))
        ow, oh = (int(v) for v in rng.integers(4, 160, 2))
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        direct = np.asarray(img.resize((ow, oh), Image.Resampling.BICUBIC))
        h_first = np.asarray(img.resize((ow, h), Image.Resampling.BICUBIC).resize((ow, oh), Image.Resampling.BICUBIC))
        v_first = np.asarray(img.resize((w, oh), Image.Resampling.BICUBIC).resize((ow, oh), Image.Resampling.BICUBIC))
        if np.array_equal(h_first, v_first):
            continue
        expected = v_first if pillow_vertical_first(w, h, ow, oh, major) else h_first
        assert np.array_equal(direct, expected), f"{w}x{h} -> {ow}x{oh}: Pillow {major} used the other pass order"
        checked += 1
    assert checked > 40


@pytest.mark.parametrize(
    "image, size, message",
    [
        (np.zeros((4, 4, 3), np.float32), (2, 2), "uint8"),
        (np.zeros((4, 4), np.uint8), (2, 2), r"\(H, W, 3\)"),
        (np.zeros((0, 4, 3), np.uint8), (2, 2), "non-empty"),
        (np.zeros((4, 4, 3), np.uint8), (0, 2), "positive"),
    ],
)
def test_bad_input_raises_a_clear_error(image: np.ndarray, size: tuple[int, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resize_bicubic(image, size)


def test_the_extension_refuses_a_buffer_the_image_does_not_fit() -> None:
    buffer = np.zeros(100, np.uint8)
    out = np.empty((2, 2, 3), np.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        _resample.resize(buffer, 10, 30, 3, 10, 4, out, 2, 2, False)
    with pytest.raises(ValueError, match="dst holds"):
        _resample.resize(buffer, 0, 30, 3, 10, 3, np.empty(5, np.uint8), 2, 2, False)
    with pytest.raises(ValueError, match="pixel_bytes"):
        _resample.resize(buffer, 0, 30, 2, 10, 3, out, 2, 2, False)


def test_resampler_builds_for_jetson_with_neon_multiply_accumulates(tmp_path: Path) -> None:
    """Jetson is aarch64: the portable loops must compile there and vectorise (NEON mla), not fall to scalar."""
    compiler = shutil.which("aarch64-linux-gnu-gcc")
    if compiler is None:
        pytest.skip("aarch64-linux-gnu-gcc is not installed (Debian: gcc-aarch64-linux-gnu)")
    source = Path(fundusrt.kernels.__file__).with_name("_resample.c")
    library = tmp_path / "_resample.so"
    done = subprocess.run(
        [compiler, "-O3", "-ffp-contract=off", "-Wall", "-Werror", "-Wno-missing-field-initializers", "-shared", "-fPIC",
         "-I", sysconfig.get_paths()["include"], str(source), "-o", str(library)],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 0, done.stderr
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if objdump is None:
        pytest.skip("aarch64-linux-gnu-objdump is not installed")
    listing = subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout
    assert len(re.findall(r"\smla\s+v\d+\.4s", listing)) >= 4, "no NEON multiply-accumulate in the aarch64 build"


ASAN_SCRIPT = """
import sys
import numpy as np
from PIL import Image
import _resample

rng = np.random.default_rng(5)
for case in range(120):
    w, h, ow, oh = (int(v) for v in rng.integers(1, 90, 4))
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    picture = Image.fromarray(image)
    expected = {  # one axis per Pillow call fixes the pass order
        False: picture.resize((ow, h), Image.Resampling.BICUBIC).resize((ow, oh), Image.Resampling.BICUBIC),
        True: picture.resize((w, oh), Image.Resampling.BICUBIC).resize((ow, oh), Image.Resampling.BICUBIC),
    }
    rgbx = np.empty((h, w, 4), np.uint8)  # no spare row: the crop ends where the buffer ends
    rgbx[..., :3] = image
    for vertical_first in (False, True):
        for source, px, stride in ((image.copy(), 3, w * 3), (rgbx.copy(), 4, w * 4)):
            for portable in (False, True):
                out = np.empty((oh, ow, 3), np.uint8)
                _resample.resize(source, 0, stride, px, w, h, out, ow, oh, vertical_first, portable)
                assert np.array_equal(out, np.asarray(expected[vertical_first])), (case, w, h, ow, oh, px, portable)
print("clean")
"""


def test_resampler_reads_no_byte_outside_its_buffers_under_asan(tmp_path: Path) -> None:
    """AddressSanitizer build: every pass order, layout and loop flavour on buffers that end at the image."""
    compiler = shutil.which("gcc")
    libasan = subprocess.run([compiler or "gcc", "-print-file-name=libasan.so"], capture_output=True, text=True,
                             check=False).stdout.strip() if compiler else ""
    if not compiler or not os.path.isabs(libasan):
        pytest.skip("gcc with libasan is not installed")
    source = Path(fundusrt.kernels.__file__).with_name("_resample.c")
    library = tmp_path / f"_resample{sysconfig.get_config_var('EXT_SUFFIX')}"
    subprocess.run(
        [compiler, "-O1", "-g", "-fsanitize=address", "-fno-omit-frame-pointer", "-ffp-contract=off", "-shared",
         "-fPIC", "-I", sysconfig.get_paths()["include"], str(source), "-o", str(library)],
        capture_output=True, text=True, check=True,
    )
    env = {**os.environ, "LD_PRELOAD": libasan, "ASAN_OPTIONS": "detect_leaks=0", "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", ASAN_SCRIPT], capture_output=True, text=True, env=env, check=False,
                          timeout=300)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]

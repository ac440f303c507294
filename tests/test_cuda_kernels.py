"""CUDA patching kernels: compile checks (nvcc, NVRTC), the kernels' arithmetic built for the host with
g++ and compared with PIL and the CPU path, and real-GPU parity tests (marked gpu, skipped without one).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundusrt._deps import MissingDependencyError
from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, TilingConfig
from fundusrt.kernels.cuda import HOST_HARNESS_PATH, SOURCE_PATH
from fundusrt.kernels.cuda.tables import build_launch_tables
from fundusrt.kernels.patchify import normalisation_lut, patchify
from fundusrt.kernels.roi import find_fundus_roi, roi_from_sample, subsample_step
from fundusrt.kernels.tiling import TilePlan, plan_tiles

KERNEL_NAMES = ("frt_axis_coeffs", "frt_first_pass", "frt_tiles_f32", "frt_tiles_f16", "frt_roi_sample")
ANYRES_PINPOINTS = [(384, 768), (768, 384), (768, 768), (1152, 384), (384, 1152)]
CONFIGS = {
    "internvl": TilingConfig(),
    "internvl_no_thumb_max6": TilingConfig(max_tiles=6, use_thumbnail=False),
    "anyres": TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=ANYRES_PINPOINTS, mean=SIGLIP_MEAN,
                           std=SIGLIP_STD),
    "anyres_no_global": TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=ANYRES_PINPOINTS,
                                     use_thumbnail=False),
    "single": TilingConfig(policy="single", tile_size=224),
}
# (width, height): up- and downscales on each axis, extreme aspect ratios, degenerate sizes
SIZES = [(2000, 1500), (640, 480), (448, 448), (300, 1000), (1000, 250), (37, 900), (1920, 1080), (3, 2), (1, 1)]


# -- host build of the kernel arithmetic ---------------------------------------------------------


@pytest.fixture(scope="session")
def host_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    binary = tmp_path_factory.mktemp("cuda_host") / "patchify_host"
    # -ffp-contract=off: no FMA contraction, like --fmad=false on the device and like Pillow on x86-64
    cmd = [compiler, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
           "-o", str(binary), str(HOST_HARNESS_PATH)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return binary


def run_host_patchify(binary: Path, workdir: Path, image: np.ndarray, plan: TilePlan, cfg: TilingConfig):
    """Run the harness over `plan`; returns uint8 tiles, float32 tiles and float16 tiles (N, 3, S, S)."""
    height, width = image.shape[:2]
    tables = build_launch_tables(plan, width, height)
    header = np.array([height, width, len(tables.views), len(tables.jobs), tables.num_tiles, tables.tile_size,
                       tables.table_ints, tables.tmp_bytes, tables.pad_rgb, 0], dtype=np.int32)
    parts = (header, normalisation_lut(cfg.mean, cfg.std, np.float32),
             normalisation_lut(cfg.mean, cfg.std, np.float16).view(np.uint16),
             tables.views, tables.jobs, tables.tiles, np.ascontiguousarray(image))
    (workdir / "in.bin").write_bytes(b"".join(p.tobytes() for p in parts))
    subprocess.run([str(binary), "patchify", str(workdir / "in.bin"), str(workdir / "out.bin")],
                   check=True, capture_output=True, text=True)
    raw = np.fromfile(workdir / "out.bin", dtype=np.uint8)
    shape = (plan.num_tiles, 3, plan.tile_size, plan.tile_size)
    n = int(np.prod(shape))
    assert raw.size == 7 * n, f"harness wrote {raw.size} bytes, expected {7 * n}"
    return (raw[:n].reshape(shape), raw[n:5 * n].view(np.float32).reshape(shape),
            raw[5 * n:].view(np.float16).reshape(shape))


def run_host_roi(binary: Path, workdir: Path, image: np.ndarray):
    """The box the GPU path decides: the harness gathers the sample as the kernel does, roi_from_sample decides."""
    height, width = image.shape[:2]
    step = subsample_step(height, width)
    parts = (np.array([height, width, step, 0], dtype=np.int32), np.ascontiguousarray(image))
    (workdir / "roi.bin").write_bytes(b"".join(p.tobytes() for p in parts))
    subprocess.run([str(binary), "roi", str(workdir / "roi.bin"), str(workdir / "sample.bin")], check=True)
    sample = np.fromfile(workdir / "sample.bin", dtype=np.uint8).reshape(-(-height // step), -(-width // step), 3)
    np.testing.assert_array_equal(sample, image[::step, ::step])
    return roi_from_sample(sample, step, height, width)


def pil_tiles(image: np.ndarray, plan: TilePlan) -> np.ndarray:
    """Independent reference: PIL crop, resize (BICUBIC), paste on the padded canvas, crop each tile."""
    source = Image.fromarray(image)
    if plan.roi is not None:
        source = source.crop(plan.roi)
    tiles = []
    for tile in plan.tiles:
        canvas = Image.new("RGB", tile.canvas, plan.pad_value)
        canvas.paste(source.resize(tile.resize_to, Image.Resampling.BICUBIC), tile.paste_at)
        tiles.append(np.asarray(canvas.crop(tile.box)).transpose(2, 0, 1))
    return np.stack(tiles)


def noise_image(width: int, height: int, seed: int) -> np.ndarray:
    # white noise is the worst case for resampling: maximal overshoot and clipping
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def fundus_like(width: int, height: int, seed: int) -> np.ndarray:
    """A bright textured disc on a dark noisy surround, with a small burnt-in label in a corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    cx, cy, r = width * 0.52, height * 0.47, min(width, height) * 0.42
    inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
    image = rng.integers(0, 9, (height, width, 3)).astype(np.int32)
    texture = rng.integers(0, 60, (height, width, 1))
    image[inside] = (np.array([170, 80, 30]) + texture)[inside]
    image[5:9, 5:40] = 255
    image = np.clip(image, 0, 255).astype(np.uint8)
    # move pixels off exact luminance ties (299 R + 587 G + 114 B == 20000), where the float32 reference
    # answer depends on numpy's memory layout
    tie = image.astype(np.int64) @ np.array([299, 587, 114]) == 20000
    image[tie, 2] += 1
    return image


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("with_roi", [False, True])
def test_host_kernels_match_pil_and_cpu_path(host_binary: Path, tmp_path: Path, name: str, with_roi: bool) -> None:
    cfg = CONFIGS[name]
    for index, (width, height) in enumerate(SIZES):
        image = noise_image(width, height, seed=index)
        roi = (width // 7, height // 5, width - width // 9, height - height // 11) if with_roi else None
        if roi is not None and (roi[0] >= roi[2] or roi[1] >= roi[3]):
            roi = None
        plan = plan_tiles(width, height, cfg, roi=roi)
        rgb, f32, f16 = run_host_patchify(host_binary, tmp_path, image, plan, cfg)
        reference = pil_tiles(image, plan)
        diff = int(np.abs(rgb.astype(np.int16) - reference).max())
        assert diff <= 2, f"{name} {width}x{height} roi={roi}: max uint8 diff {diff} vs PIL (tolerance 2)"
        if roi is None:
            cpu = patchify(image, cfg)
            assert cpu.plan.grid == plan.grid and cpu.num_tiles == plan.num_tiles
            tolerance = 2 / 255 / min(cfg.std) + 1e-6
            err = float(np.abs(f32 - cpu.pixel_values).max())
            assert err <= tolerance, f"{name} {width}x{height}: float32 max diff {err} vs CPU path"
            cpu16 = patchify(image, cfg, dtype=np.float16).pixel_values.astype(np.float32)
            err16 = float(np.abs(f16.astype(np.float32) - cpu16).max())
            assert err16 <= tolerance + 1e-2, f"{name} {width}x{height}: float16 max diff {err16} vs CPU path"


def test_host_kernels_follow_the_cpu_roi_crop(host_binary: Path, tmp_path: Path) -> None:
    for seed, (width, height) in enumerate([(1600, 1200), (2100, 1400), (700, 900)]):
        image = fundus_like(width, height, seed)
        for cfg in (TilingConfig(roi_crop=True), CONFIGS["anyres"]):
            cfg = TilingConfig(**{**cfg.to_dict(), "roi_crop": True})
            roi = run_host_roi(host_binary, tmp_path, image)
            assert roi == find_fundus_roi(image), f"{width}x{height}: harness ROI {roi} != find_fundus_roi"
            cpu = patchify(image, cfg)
            plan = plan_tiles(width, height, cfg, roi=roi)
            assert plan == cpu.plan
            _, f32, _ = run_host_patchify(host_binary, tmp_path, image, plan, cfg)
            err = float(np.abs(f32 - cpu.pixel_values).max())
            assert err <= 2 / 255 / min(cfg.std), f"{width}x{height} roi {roi}: max diff {err} vs CPU path"


@pytest.mark.parametrize(
    "make",
    [
        lambda: fundus_like(640, 480, 1),
        lambda: fundus_like(2500, 1700, 2),  # subsampled by 3
        lambda: fundus_like(300, 900, 3)[:, ::-1].copy(),
        lambda: np.zeros((50, 60, 3), np.uint8),  # all dark: no ROI
        lambda: np.full((50, 60, 3), 200, np.uint8),  # all bright: no ROI
        lambda: fundus_like(1024, 1024, 4)[:600],  # disc cut by the frame
    ],
)
def test_host_roi_matches_find_fundus_roi(host_binary: Path, tmp_path: Path, make) -> None:
    image = make()
    assert run_host_roi(host_binary, tmp_path, image) == find_fundus_roi(image)


def test_launch_tables_reject_a_plan_for_another_image() -> None:
    plan = plan_tiles(800, 600, TilingConfig())
    with pytest.raises(ValueError, match="does not fit"):
        build_launch_tables(plan, 640, 480)


# -- compilation (no GPU needed) ------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["87", "90"])
def test_nvcc_compiles_ptx(tmp_path: Path, arch: str) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    out = tmp_path / f"patchify_{arch}.ptx"
    done = subprocess.run([nvcc, "--ptx", f"-arch=compute_{arch}", "--fmad=false", "-std=c++17", "-o", str(out),
                           str(SOURCE_PATH)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ptx = out.read_text()
    assert f".target sm_{arch}" in ptx
    for name in KERNEL_NAMES:
        assert f".entry {name}(" in ptx, f"kernel {name} missing from the compute_{arch} PTX"


def test_nvrtc_compiles_without_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cuda.bindings.nvrtc")
    from fundusrt.kernels.cuda.build import cache_dir, nvrtc_compile

    monkeypatch.setenv("FUNDUSRT_CACHE", str(tmp_path))
    for arch in (87, 90):
        image, kind = nvrtc_compile(arch)
        assert kind == "cubin" and image[:4] == b"\x7fELF"
        cached = list(cache_dir().glob(f"patchify-*-sm_{arch}.cubin"))
        assert len(cached) == 1 and cached[0].read_bytes() == image
        assert nvrtc_compile(arch) == (image, kind)  # served from the cache


def test_nvcc_fatbin_is_found_by_source_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    from fundusrt.kernels.cuda.build import build_fatbin, find_fatbin

    monkeypatch.setenv("FUNDUSRT_CACHE", str(tmp_path))
    assert find_fatbin() is None
    path = build_fatbin()
    assert find_fatbin() == path and path.stat().st_size > 0


def test_launcher_imports_and_fails_clearly_without_a_driver() -> None:
    from fundusrt.kernels import cuda_patchify

    try:
        cuda_patchify.CudaPatchifier()
    except (cuda_patchify.CudaError, MissingDependencyError) as exc:
        assert "install" in str(exc) or "CPU path" in str(exc)
    else:
        pytest.skip("a CUDA driver and GPU are present")


# -- real GPU -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu():
    from fundusrt.kernels import cuda_patchify

    try:
        return cuda_patchify.default_patchifier(0)
    except (cuda_patchify.CudaError, MissingDependencyError) as exc:
        pytest.skip(f"no usable GPU: {exc}")


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_gpu_patchify_matches_cpu_path(gpu, name: str, dtype) -> None:
    cfg = CONFIGS[name]
    for index, (width, height) in enumerate(SIZES + [(4288, 2848)]):
        image = noise_image(width, height, seed=index)
        cpu = patchify(image, cfg, dtype=dtype)
        with gpu.patchify(image, cfg, dtype=dtype) as out:
            assert out.plan == cpu.plan
            iface = out.__cuda_array_interface__
            assert iface["shape"] == cpu.pixel_values.shape and iface["typestr"] == np.dtype(dtype).str
            got = out.to_host()
        err = float(np.abs(got.astype(np.float32) - cpu.pixel_values.astype(np.float32)).max())
        tolerance = 2 / 255 / min(cfg.std) + (1e-2 if dtype == np.float16 else 1e-6)
        assert err <= tolerance, f"{name} {width}x{height} {np.dtype(dtype)}: max diff {err} vs CPU path"


@pytest.mark.gpu
def test_gpu_roi_and_roi_crop_match_cpu_path(gpu) -> None:
    for seed, (width, height) in enumerate([(4288, 2848), (1600, 1200), (700, 900)]):
        image = fundus_like(width, height, seed)
        assert gpu.find_roi(image) == find_fundus_roi(image)
        cfg = TilingConfig(roi_crop=True)
        cpu = patchify(image, cfg)
        with gpu.patchify(image, cfg) as out:
            assert out.plan == cpu.plan
            err = float(np.abs(out.to_host() - cpu.pixel_values).max())
        assert err <= 2 / 255 / min(cfg.std), f"{width}x{height}: max diff {err}"

"""Benchmark the CUDA patching kernels against the CPU path and torch interpolate(antialias=True).

Needs a CUDA GPU, cuda-python and (for the torch baseline) a CUDA build of torch. Prints, per tiling
policy and dtype: CPU path ms; GPU end-to-end ms (host image upload included); GPU ms for an image
already on the device (CUDA events); effective bandwidth of that run (image bytes read + tile bytes
written, the minimum traffic) against the device's peak DRAM bandwidth; torch bicubic-antialias ms.

    python benchmarks/bench_cuda_patchify.py --width 4288 --height 2848 --repeat 50 [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, TilingConfig
from fundusrt.kernels.cuda_patchify import CudaPatchifier, _driver, check_cuda
from fundusrt.kernels.patchify import patchify

POLICIES = {
    "internvl_dynamic": TilingConfig(),
    "anyres": TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=[(384, 768), (768, 384), (768, 768),
                                                                          (1152, 384), (384, 1152)],
                           mean=SIGLIP_MEAN, std=SIGLIP_STD),
    "single": TilingConfig(policy="single"),
}


def peak_dram_gbps(device: int) -> float:
    """Theoretical DRAM bandwidth from the memory clock and bus width (DDR: two transfers per clock)."""
    drv = _driver()
    dev = check_cuda(drv.cuDeviceGet(device), "cuDeviceGet")
    attr = drv.CUdevice_attribute
    clock_khz = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, dev), "clock")
    bus_bits = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, dev), "bus")
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9


def median_ms(fn, repeat: int) -> float:
    fn()  # warm-up: module load, allocator pools, caches
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_ms(gpu: CudaPatchifier, image: np.ndarray, cfg: TilingConfig, dtype, repeat: int) -> tuple[float, int]:
    """Median kernel-side ms for an image already on the GPU (CUDA events), and the tile bytes written."""
    drv = _driver()
    stream = check_cuda(drv.cuStreamCreate(0), "cuStreamCreate")
    d_image = gpu._upload(image, stream)
    start, stop = (check_cuda(drv.cuEventCreate(0), "cuEventCreate") for _ in range(2))
    times = []
    nbytes = 0
    for i in range(repeat + 1):
        check_cuda(drv.cuEventRecord(start, stream), "cuEventRecord")
        out = gpu.patchify_on_device(int(d_image), image.shape[0], image.shape[1], cfg, dtype=dtype,
                                     stream=int(stream))
        check_cuda(drv.cuEventRecord(stop, stream), "cuEventRecord")
        check_cuda(drv.cuEventSynchronize(stop), "cuEventSynchronize")
        nbytes = out.nbytes
        out.close()
        if i:  # the first run warms the allocator pool
            times.append(check_cuda(drv.cuEventElapsedTime(start, stop), "cuEventElapsedTime"))
    gpu.free(d_image, stream)
    check_cuda(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")
    return statistics.median(times), nbytes


def torch_ms(image: np.ndarray, cfg: TilingConfig, dtype, repeat: int) -> float | None:
    """The same resize + normalise + tiling with torch interpolate(bicubic, antialias=True) on the GPU."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    from fundusrt.kernels.tiling import plan_tiles

    plan = plan_tiles(image.shape[1], image.shape[0], cfg)
    targets = sorted({tile.resize_to for tile in plan.tiles})
    src = torch.from_numpy(image).cuda().permute(2, 0, 1)[None]
    mean = torch.tensor(cfg.mean, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device="cuda").view(1, 3, 1, 1)
    tdtype = torch.float16 if np.dtype(dtype) == np.float16 else torch.float32
    size = plan.tile_size

    def run() -> None:
        x = src.float()
        resized = {t: ((F.interpolate(x, size=(t[1], t[0]), mode="bicubic", antialias=True, align_corners=False)
                        .clamp(0, 255).round() / 255 - mean) / std).to(tdtype) for t in targets}
        tiles = []
        for tile in plan.tiles:
            canvas = resized[tile.resize_to]
            x0, y0 = tile.box[0] - tile.paste_at[0], tile.box[1] - tile.paste_at[1]
            tiles.append(canvas[:, :, max(y0, 0):y0 + size, max(x0, 0):x0 + size])
        torch.cat([F.pad(t, (0, size - t.shape[3], 0, size - t.shape[2])) for t in tiles])

    run()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        run()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=4288)
    parser.add_argument("--height", type=int, default=2848)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()

    gpu = CudaPatchifier(args.device)
    peak = peak_dram_gbps(args.device)
    image = np.random.default_rng(0).integers(0, 256, (args.height, args.width, 3), dtype=np.uint8)
    print(f"image {args.width}x{args.height}, GPU sm_{gpu.arch}, peak DRAM {peak:.0f} GB/s")
    print(f"{'policy':18} {'dtype':8} {'tiles':>5} {'cpu ms':>8} {'gpu e2e':>8} {'gpu dev':>8} {'GB/s':>7} "
          f"{'%peak':>6} {'torch ms':>9}")
    rows = []
    for name, cfg in POLICIES.items():
        for dtype in (np.float16, np.float32):
            cpu = median_ms(lambda: patchify(image, cfg, dtype=dtype), max(3, args.repeat // 10))
            e2e = median_ms(lambda: gpu.patchify(image, cfg, dtype=dtype).close(), args.repeat)
            dev, out_bytes = device_ms(gpu, image, cfg, dtype, args.repeat)
            gbps = (image.nbytes + out_bytes) / (dev * 1e-3) / 1e9
            ref = torch_ms(image, cfg, dtype, args.repeat)
            tiles = out_bytes // (3 * cfg.tile_size**2 * np.dtype(dtype).itemsize)
            print(f"{name:18} {np.dtype(dtype).name:8} {tiles:5d} {cpu:8.2f} {e2e:8.2f} {dev:8.3f} {gbps:7.0f} "
                  f"{100 * gbps / peak:5.1f}% {'n/a' if ref is None else f'{ref:9.3f}':>9}")
            rows.append({"policy": name, "dtype": np.dtype(dtype).name, "tiles": int(tiles), "cpu_ms": cpu,
                         "gpu_e2e_ms": e2e, "gpu_device_ms": dev, "gb_per_s": gbps, "peak_dram_gb_per_s": peak,
                         "fraction_of_peak": gbps / peak, "torch_interpolate_ms": ref})
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"image": [args.width, args.height], "arch": gpu.arch, "rows": rows}, out, indent=2)


if __name__ == "__main__":
    main()

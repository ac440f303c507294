"""Decode + patchify of one fundus study image: fundusrt against pydicom + transformers.

Ours:      fundusrt.dicom.read_dicom_file (libjpeg-turbo into RGBX) -> fundusrt.kernels.patchify
Baseline:  pydicom.dcmread(...).pixel_array (pydicom's default decoder) -> transformers' PIL image
           processor (GotOcr2ImageProcessorPil with crop_to_patches for InternVL,
           LlavaOnevisionImageProcessorPil for AnyRes)

Both sides start from the same DICOM file (a synthetic 4288x2848 fundus photograph, JPEG Baseline
YBR_FULL_422) and produce the same tiles; the script prints both medians, the speed-up ratio measured
in this one run, and the largest pixel difference between the two outputs.

Run:  python benchmarks/bench_patchify.py [--policy internvl_dynamic|anyres] [--repeat 11]
Needs the [export] extra (transformers) for the baseline; no torch or torchvision is used.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fundusrt.bench.machine import cpu_summary
from fundusrt.config import IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD, TilingConfig
from fundusrt.kernels import patchify

ONEVISION_PINPOINTS = [(384 * i, 384 * j) for j in range(1, 7) for i in range(1, 7)]  # (w, h), HF order


def tiling_and_processor(policy: str) -> tuple[TilingConfig, Callable[[np.ndarray], np.ndarray]]:
    """Our TilingConfig and the equivalent transformers PIL processor for one policy."""
    if policy == "internvl_dynamic":
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        cfg = TilingConfig(policy=policy, tile_size=448, max_tiles=12, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        processor = GotOcr2ImageProcessorPil(
            size={"height": 448, "width": 448},
            crop_to_patches=True,
            max_patches=12,
            image_mean=list(IMAGENET_MEAN),
            image_std=list(IMAGENET_STD),
        )
        return cfg, lambda rgb: np.asarray(processor(images=rgb, return_tensors="np")["pixel_values"])
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    cfg = TilingConfig(policy="anyres", tile_size=384, grid_pinpoints=ONEVISION_PINPOINTS, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    processor = LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=[[h, w] for w, h in ONEVISION_PINPOINTS],
        image_mean=list(SIGLIP_MEAN),
        image_std=list(SIGLIP_STD),
    )
    return cfg, lambda rgb: np.asarray(processor(images=rgb, return_tensors="np")["pixel_values"])[0]


def write_study_image(directory: Path, width: int, height: int) -> Path:
    """Draw a synthetic fundus photograph and store it as a JPEG Baseline OP DICOM file."""
    from fundusrt.synth import write_op_image
    from fundusrt.synth.fundus import CaseSpec, draw_fundus

    rgb, _ = draw_fundus(CaseSpec("R", 2, False, 0.4, width, height, seed=11))
    path = directory / "study.dcm"
    write_op_image(path, rgb, laterality="R", transfer_syntax="jpeg-baseline")
    return path


def interleaved_medians(runs: dict[str, Callable[[], np.ndarray]], repeat: int) -> dict[str, tuple[float, np.ndarray]]:
    """Median wall time in ms of each run and its last output, after one warm-up each.

    The runs alternate round by round, so a slow spell of a shared machine hits both sides alike.
    """
    outputs = {name: run() for name, run in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeat):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: (statistics.median(times[name]), outputs[name]) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", choices=("internvl_dynamic", "anyres"), default="internvl_dynamic")
    parser.add_argument("--width", type=int, default=4288)
    parser.add_argument("--height", type=int, default=2848)
    parser.add_argument("--repeat", type=int, default=11)
    args = parser.parse_args()

    import pydicom

    from fundusrt.dicom import read_dicom_file

    cfg, processor = tiling_and_processor(args.policy)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_study_image(Path(tmp), args.width, args.height)

        decode_ms: list[float] = []

        def ours() -> np.ndarray:
            start = time.perf_counter()
            images, result = read_dicom_file(path)
            decode_ms.append((time.perf_counter() - start) * 1000)
            if not images:
                raise SystemExit(f"fundusrt could not read the benchmark file: {result}")
            return patchify(images[0].pixels, cfg).pixel_values

        def baseline() -> np.ndarray:
            return processor(pydicom.dcmread(path).pixel_array)

        measured = interleaved_medians({"ours": ours, "baseline": baseline}, args.repeat)
        (ours_ms, ours_out), (base_ms, base_out) = measured["ours"], measured["baseline"]

    if ours_out.shape != base_out.shape:
        raise SystemExit(f"outputs differ in shape: fundusrt {ours_out.shape}, transformers {base_out.shape}")
    std = np.asarray(cfg.std)[None, :, None, None]
    diff = float(np.abs((ours_out.astype(np.float64) - base_out) * std).max()) * 255
    print(f"CPU: {cpu_summary()}")
    print(f"image {args.width}x{args.height} JPEG Baseline, policy {args.policy}, {ours_out.shape[0]} tiles, median of {args.repeat}")
    print(f"fundusrt  decode+patchify          {ours_ms:8.1f} ms   (decode alone {statistics.median(decode_ms):.1f} ms)")
    print(f"baseline  pydicom+transformers PIL {base_ms:8.1f} ms")
    print(f"speed-up  {base_ms / ours_ms:.2f}x   (max pixel difference {diff:.2f}/255; decoders may differ by a few levels)")


if __name__ == "__main__":
    main()

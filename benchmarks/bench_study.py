"""Images/s of a study's images encoded together (tiles batched through vision and connector) against one image
per call, on the same package in the same run.

    python benchmarks/bench_study.py --package PKG          # e.g. fundusrt export models/demo --out PKG --max-seq-len 512
    python benchmarks/bench_study.py --random-tower          # a random SigLIP-B/16-sized tower (86 M), 224 px tiles

Times `Pipeline.encode_images` (patching, vision, connector) of N synthetic fundus images with
`max_tiles_per_call` at its default against 1 (one image per call), the two alternating round by round
so that both see the same load, and `run_study` on an N-image synthetic study both ways (which adds the
protocol scoring, unchanged by batching). Prints medians, images/s, the ratio, the CPU and the thread count.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from fundusrt.config import GenerationConfig
from fundusrt.dicom import Study, read_study
from fundusrt.runtime.pipeline import DEFAULT_MAX_TILES_PER_CALL, Pipeline, load_package


def random_tower_package(out: Path) -> Path:
    """Export a random model with a SigLIP-B/16-sized vision tower (12 layers, 768 wide, 224 px) and a tiny decoder."""
    from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, TilingConfig, VisionConfig
    from fundusrt.export import export_package
    from fundusrt.models.layouts import native
    from fundusrt.models.tiny import build_tiny_model, tiny_config
    from fundusrt.models.tokenizer import build_tokenizer

    config = tiny_config("siglip-mlp", build_tokenizer().get_vocab_size())
    config = dataclasses.replace(
        config, name="random-siglip-b16",
        vision=VisionConfig(type="siglip", hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
                            image_size=224, patch_size=16),
        tiling=TilingConfig(policy="single", tile_size=224, max_tiles=1, use_thumbnail=False,
                            mean=SIGLIP_MEAN, std=SIGLIP_STD))
    checkpoint = native.save(build_tiny_model(config=config), out / "ckpt")
    return Path(export_package(checkpoint, out / "pkg", max_seq_len=512))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def alternate(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds of each run, the runs alternating round by round (one untimed warm-up each)."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def report(what: str, seconds: dict[str, float], images: int) -> None:
    alone, together = seconds["one image per call"], seconds["batched"]
    print(f"{what}: one image per call {alone * 1000:.1f} ms ({images / alone:.2f} images/s), "
          f"batched {together * 1000:.1f} ms ({images / together:.2f} images/s): {alone / together:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, help="model package (default with --random-tower: built here)")
    parser.add_argument("--random-tower", action="store_true", help="export and use a random SigLIP-B/16 tower")
    parser.add_argument("--images", type=int, default=4, help="images of the study (4)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every session (2)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds of each way (9)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-study-") as scratch:
        package = args.package or (random_tower_package(Path(scratch)) if args.random_tower else None)
        if package is None:
            parser.error("pass --package PKG or --random-tower")
        pipe = load_package(package, threads=args.threads)
        from fundusrt.synth import write_study

        # synthetic studies; the images of the first ones make up the N images
        studies = [read_study(write_study(Path(scratch) / f"s{seed}", seed=seed, size=(1024, 768)).out_dir)
                   for seed in range(args.images)]
        study = next((s for s in studies if len(s.images) >= args.images), None)
        images = [im.pixels for s in studies for im in s.images][:args.images]
        tiles = sum(e.num_tiles for e in pipe.encode_images(images))
        print(f"{pipe.manifest.name} ({package}); {cpu_name()}, {os.cpu_count()} logical CPUs, "
              f"{args.threads} intra-op threads; {len(images)} images of {images[0].shape[1]}x{images[0].shape[0]}, "
              f"{tiles} tiles; max_tiles_per_call {DEFAULT_MAX_TILES_PER_CALL} vs 1; medians of {args.rounds} rounds")
        seconds = alternate({"one image per call": lambda: pipe.encode_images(images, max_tiles_per_call=1),
                             "batched": lambda: pipe.encode_images(images)}, args.rounds)
        report("encode (patching + vision + connector)", seconds, len(images))
        if study is not None:
            report(f"run_study ({len(study.images)}-image study, protocol scored)",
                   alternate({"one image per call": lambda: _study(pipe, study, 1),
                              "batched": lambda: _study(pipe, study, DEFAULT_MAX_TILES_PER_CALL)}, args.rounds),
                   len(study.images))


def _study(pipe: Pipeline, study: Study, bound: int) -> None:
    """One run_study with one-token answers, so that the timing is mostly encoding and protocol scoring."""
    pipe.max_tiles_per_call = bound
    pipe.run_study(study, ["Describe the fundus."], GenerationConfig(max_new_tokens=1))


if __name__ == "__main__":
    main()

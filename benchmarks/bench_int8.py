"""ONNX Runtime CPU: INT8 Q/DQ package vs its fp32 package, timed in the same run on the same inputs.

    python benchmarks/bench_int8.py [--fp32 PKG --int8 PKG] [--shape small|tiny] [--threads N]
                                    [--new-tokens 32] [--repeats 5] [--decoder qdq|int8-weight|int4-weight]
                                    [--workdir DIR]

Without --fp32/--int8 it builds a random model of --shape (native checkpoint -> `export_package`),
writes synthetic studies, and calibrates it with `calibrate_package` (gate forced: random weights
are not the point here). Both packages are loaded with the ort-cpu backend and the same thread
count; each repeat times image encoding (vision + connector), prefill and --new-tokens greedy decode
steps for fp32 then INT8, and the medians are reported with the INT8 speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

QUESTION = "Describe the findings in this fundus photograph."


def small_config(vocab_size: int):
    """A model big enough for matrix products to dominate: 224 px tiles, 6+6 layers of width 384/512."""
    from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, ConnectorConfig, ModelConfig, TilingConfig, VisionConfig
    from fundusrt.models.tiny import tiny_text_config

    text = tiny_text_config(vocab_size)
    text.config.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=2)
    vision = VisionConfig(type="siglip", hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536,
                          image_size=224, patch_size=14)
    tiling = TilingConfig(policy="single", tile_size=224, max_tiles=1, use_thumbnail=False,
                          mean=SIGLIP_MEAN, std=SIGLIP_STD)
    return ModelConfig(vision=vision, connector=ConnectorConfig(type="mlp", feature_layer=-1), text=text,
                       tiling=tiling, name="bench-small", family="siglip-mlp")


def build_packages(workdir: Path, shape: str, decoder: str, threads: int) -> tuple[Path, Path]:
    """fp32 and INT8 packages of a random `shape` model in `workdir` (reused when present)."""
    from fundusrt.calibration import CalibrationSettings, GateThresholds, QuantOptions, calibrate_package
    from fundusrt.export import export_package
    from fundusrt.models.layouts import native
    from fundusrt.models.tiny import build_tiny_model
    from fundusrt.models.tokenizer import build_tokenizer
    from fundusrt.synth import write_study

    fp32, int8 = workdir / "fp32", workdir / f"int8-{decoder}"
    if not fp32.exists():
        config = small_config(build_tokenizer().get_vocab_size()) if shape == "small" else None
        checkpoint = native.save(build_tiny_model("siglip-dense", seed=0, config=config), workdir / "checkpoint")
        export_package(checkpoint, fp32, max_seq_len=1024)
    if not int8.exists():
        studies = workdir / "studies"
        for seed in range(2):
            write_study(studies / f"study_{seed}", seed, size=(512, 384))
        result = calibrate_package(fp32, [studies], int8, options=QuantOptions(decoder=decoder),
                                   thresholds=GateThresholds(0, 0, 0, 0, 0),
                                   settings=CalibrationSettings(max_images=8, holdout_images=2, gate_tokens=8),
                                   cache_dir=workdir / "cache", threads=threads)
        print(result.gate.summary(), flush=True)
    return fp32, int8


def time_once(pipe, image: np.ndarray, new_tokens: int) -> dict[str, float]:
    """Encode, prefill and `new_tokens` greedy steps (stop tokens ignored), in ms."""
    start = time.perf_counter()
    encoded = pipe.encode_image(image)
    encode_ms = (time.perf_counter() - start) * 1e3
    _, embeds = pipe.prompt_embeds(encoded, QUESTION)
    decoder = pipe.sessions.decoder
    decoder.reset()
    start = time.perf_counter()
    logits = decoder.prefill(embeds)
    prefill_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = decoder.decode(int(np.argmax(logits)))
    decode_s = time.perf_counter() - start
    return {"encode_ms": encode_ms, "prefill_ms": prefill_ms, "decode_tok_s": new_tokens / decode_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp32", type=Path, default=None, help="fp32 package (with --int8)")
    parser.add_argument("--int8", type=Path, default=None, help="INT8 package calibrated from --fp32")
    parser.add_argument("--shape", choices=["small", "tiny"], default="small", help="model built when no packages")
    parser.add_argument("--decoder", default="qdq", help="decoder mode of the INT8 package built here")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the built packages here")
    args = parser.parse_args()

    from fundusrt.runtime.pipeline import load_package
    from fundusrt.synth import draw_fundus, random_case

    if (args.fp32 is None) != (args.int8 is None):
        parser.error("give both --fp32 and --int8, or neither")
    if args.fp32 is None:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fundusrt-bench-int8-"))
        workdir.mkdir(parents=True, exist_ok=True)
        args.fp32, args.int8 = build_packages(workdir, args.shape, args.decoder, args.threads)
    pipes = {"fp32": load_package(args.fp32, threads=args.threads), "int8": load_package(args.int8, threads=args.threads)}
    image, _ = draw_fundus(random_case(7, 640, 480))
    for pipe in pipes.values():  # warm-up: first runs allocate arenas and pick kernels
        time_once(pipe, image, 2)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            runs[name].append(time_once(pipe, image, args.new_tokens))
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    fp32, int8 = medians["fp32"], medians["int8"]
    print(f"\n{pipes['int8'].manifest.precision} vs fp32, ORT CPU, {args.threads} threads, {args.new_tokens} new "
          f"tokens, median of {args.repeats}")
    print(f"{'':10s}{'encode ms':>12s}{'prefill ms':>12s}{'decode tok/s':>14s}")
    for name, m in medians.items():
        print(f"{name:10s}{m['encode_ms']:12.1f}{m['prefill_ms']:12.1f}{m['decode_tok_s']:14.1f}")
    print(f"{'speed-up':10s}{fp32['encode_ms'] / int8['encode_ms']:11.2f}x{fp32['prefill_ms'] / int8['prefill_ms']:11.2f}x"
          f"{int8['decode_tok_s'] / fp32['decode_tok_s']:13.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End-to-end latency: transformers eager (PyTorch) vs fundusrt ONNX Runtime, one image, same run.

Builds a random model with the FundusExpert-mini shape (InternViT-300M at 448 px, 1 tile, pixel
shuffle, Qwen2.5-0.5B decoder), writes it as a native checkpoint, exports the package, then times
each side in its own subprocess (so peak RSS is per side) with the same prompt and image:

    python benchmarks/bench_e2e.py [--vocab-size 151674] [--new-tokens 32] [--threads N] [--workdir DIR]
                                   [--decoders torch,int4]

--decoders lists the packages measured: "torch" (the decoder exported by torch.onnx, fp32) and/or
"fp32" / "int8" / "int4" (decoders built by onnxruntime-genai, see `fundusrt export --decoder`).

Prints vision ms, prefill ms, decode tok/s, end-to-end ms and peak RSS for both sides, and the ratios.
Both sides decode greedily for exactly --new-tokens tokens (stop tokens ignored), with the same
number of threads. Not a CI test: it needs ~20 GiB of RAM and several minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

QUESTION = "Describe the findings in this fundus photograph."


def fundusexpert_mini_config(vocab_size: int):
    """ModelConfig with the FundusExpert-mini (InternVL2.5-1B) shapes and a 1-tile tiling."""
    from fundusrt.config import ConnectorConfig, ModelConfig, TextConfig, TilingConfig, VisionConfig

    vision = VisionConfig(type="internvit", hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096,
                          image_size=448, patch_size=14, qkv_bias=True)
    text = TextConfig(type="qwen2", config={
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    })
    return ModelConfig(vision=vision, connector=ConnectorConfig(type="pixel_shuffle"), text=text,
                       tiling=TilingConfig(policy="internvl_dynamic", tile_size=448, max_tiles=1),
                       name="bench-fundusexpert-mini", family="internvit-shuffle")


def _peak_rss_mib() -> float:
    """High-water RSS of this process. ru_maxrss would carry the parent's peak across exec; VmHWM does not."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, bytes on macOS


def _inputs(manifest_prompt, tokenizer, size: int, tokens: int) -> tuple[np.ndarray, np.ndarray]:
    from fundusrt.prompt import build_input_ids

    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    return build_input_ids(manifest_prompt, tokenizer, QUESTION, [tokens]), pixels


def worker_torch(checkpoint: Path, new_tokens: int, threads: int) -> dict[str, object]:
    import torch
    from transformers import DynamicCache

    from fundusrt.models import load

    torch.set_num_threads(threads)
    model = load(checkpoint)
    ids, pixels = _inputs(model.prompt, model.tokenizer, model.config.vision.image_size, model.config.tokens_per_tile)
    ids_t, pixels_t = torch.from_numpy(ids)[None], torch.from_numpy(pixels)
    with torch.inference_mode():
        start = time.perf_counter()
        image_embeds = model.image_embeds(pixels_t)
        t_vision = time.perf_counter()
        embeds = model.splice(ids_t, model.embed(ids_t), image_embeds)
        mask, positions = torch.ones(1, ids.size, dtype=torch.long), torch.arange(ids.size)[None]
        logits, cache = model.decoder_step(embeds, mask, positions, DynamicCache(config=model.language_model.config))
        tokens = [int(logits[0, -1].argmax())]
        t_prefill = time.perf_counter()
        while len(tokens) < new_tokens:
            total = ids.size + len(tokens)
            logits, cache = model.decoder_step(model.embed(torch.tensor([[tokens[-1]]])),
                                               torch.ones(1, total, dtype=torch.long),
                                               torch.tensor([[total - 1]]), cache)
            tokens.append(int(logits[0, -1].argmax()))
        end = time.perf_counter()
    return _timings(start, t_vision, t_prefill, end, tokens, ids.size)


def worker_ort(package: Path, new_tokens: int, threads: int) -> dict[str, object]:
    """The shipped runtime: the ort-cpu backend's sessions (IO-bound KV cache) and generation loop."""
    from tokenizers import Tokenizer

    from fundusrt.manifest import Manifest
    from fundusrt.runtime.backends.base import open_package
    from fundusrt.runtime.generation import generate_tokens
    from fundusrt.runtime.sampling import make_sampler

    manifest = Manifest.load(package)
    sessions = open_package("ort-cpu", package, manifest, threads=threads)
    tokenizer = Tokenizer.from_file(str(package / manifest.tokenizer))
    ids, pixels = _inputs(manifest.prompt, tokenizer, manifest.preprocessing.tile_size, manifest.prompt.tokens_per_tile)

    start = time.perf_counter()
    features = sessions.vision.run({"pixel_values": pixels})["vision_features"]
    image_embeds = sessions.connector.run({"vision_features": features})["image_embeds"]
    t_vision = time.perf_counter()
    embeds = sessions.embed.run({"input_ids": ids[None]})["inputs_embeds"]
    embeds[0, ids == manifest.prompt.image_token_id] = image_embeds.reshape(-1, manifest.decoder.hidden_size)
    # stop tokens ignored so both sides decode exactly new_tokens
    stream = generate_tokens(sessions.decoder, embeds, make_sampler(), max_new_tokens=new_tokens)
    tokens = [next(stream)]
    t_prefill = time.perf_counter()
    tokens += list(stream)
    end = time.perf_counter()
    return _timings(start, t_vision, t_prefill, end, tokens, ids.size)


def _timings(start: float, t_vision: float, t_prefill: float, end: float, tokens: list[int],
             prompt_len: int) -> dict[str, object]:
    return {
        "vision_ms": (t_vision - start) * 1e3,
        "prefill_ms": (t_prefill - t_vision) * 1e3,
        "decode_tok_s": (len(tokens) - 1) / (end - t_prefill),
        "e2e_ms": (end - start) * 1e3,
        "peak_rss_mib": _peak_rss_mib(),
        "prompt_len": prompt_len,
        "tokens": tokens,
    }


def _run_worker(kind: str, path: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", str(path), "--new-tokens", str(args.new_tokens),
           "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=151674, help="decoder vocabulary (Qwen2.5: 151674)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoint and package here")
    parser.add_argument("--decoders", default="torch,int4", help="packages measured: torch, fp32, int8, int4")
    parser.add_argument("--worker", choices=["torch", "ort"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = worker_torch if args.worker == "torch" else worker_ort
        print(json.dumps(work(args.path, args.new_tokens, args.threads)))
        return 0

    import torch

    from fundusrt.bench.machine import cpu_summary
    from fundusrt.export import export_package
    from fundusrt.export.genai import GenaiDecoderOptions
    from fundusrt.models.layouts import native
    from fundusrt.models.lvlm import LVLM
    from fundusrt.models.tokenizer import build_tokenizer

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fundusrt-bench-"))
    checkpoint = workdir / "checkpoint"
    if not checkpoint.exists():
        t = time.perf_counter()
        torch.manual_seed(0)
        native.save(LVLM(fundusexpert_mini_config(args.vocab_size), build_tokenizer()).eval(), checkpoint)
        print(f"random checkpoint written in {time.perf_counter() - t:.0f} s: {checkpoint}", flush=True)
    results = {"transformers eager": _run_worker("torch", checkpoint, args)}
    for decoder in args.decoders.split(","):
        package = workdir / f"package-{decoder}"
        if not package.exists():
            t = time.perf_counter()
            genai = None if decoder == "torch" else GenaiDecoderOptions(precision=decoder)
            export_package(checkpoint, package, max_seq_len=2048, genai_decoder=genai)
            print(f"package exported in {time.perf_counter() - t:.0f} s: {package}", flush=True)
        results[f"ORT, {decoder} decoder"] = _run_worker("ort", package, args)
    torch_r = results["transformers eager"]
    print(f"CPU: {cpu_summary()}")
    print(f"\nFundusExpert-mini shape, 1 tile at 448 px, prompt {torch_r['prompt_len']} tokens, "
          f"{args.new_tokens} new tokens, {args.threads} threads, vocab {args.vocab_size}")
    print(f"{'':24s}{'vision ms':>12s}{'prefill ms':>12s}{'decode tok/s':>14s}{'e2e ms':>12s}{'peak RSS MiB':>14s}")
    for name, r in results.items():
        print(f"{name:24s}{r['vision_ms']:12.0f}{r['prefill_ms']:12.0f}{r['decode_tok_s']:14.2f}"
              f"{r['e2e_ms']:12.0f}{r['peak_rss_mib']:14.0f}")
    for name, ort_r in results.items():
        if name == "transformers eager":
            continue
        print(f"{'speed-up, ' + name.removeprefix('ORT, '):24s}{torch_r['vision_ms'] / ort_r['vision_ms']:11.2f}x"
              f"{torch_r['prefill_ms'] / ort_r['prefill_ms']:11.2f}x{ort_r['decode_tok_s'] / torch_r['decode_tok_s']:13.2f}x"
              f"{torch_r['e2e_ms'] / ort_r['e2e_ms']:11.2f}x{ort_r['peak_rss_mib'] / torch_r['peak_rss_mib']:13.2f}x (RSS ratio)")
        same = sum(a == b for a, b in zip(torch_r["tokens"], ort_r["tokens"]))
        print(f"{'':24s}greedy tokens equal to transformers: {same}/{args.new_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

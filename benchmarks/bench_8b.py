"""FundusExpert-8B at real size on this machine: write, export, run, with wall time and peak RSS per stage.

1. write: an InternVL2.5-8B-shaped checkpoint in the real InternVL chat layout (InternViT-300M-448px +
   InternLM2.5-7B, bf16, 5 GB safetensors shards + index), random weights streamed to disk tensor by
   tensor (no torch model is built);
2. export: `fundusrt export CKPT --decoder int4` (fp32 vision / connector / embeddings, INT4 MatMulNBits
   decoder streamed from the memory-mapped checkpoint);
3. run: `fundusrt run` on a synthetic 2-eye study (protocol scoring plus one short question).

Each stage runs as its own process; its peak RSS is the kernel's high-water mark for that process
(`wait4`). The goals of issue #14: every stage fits in 24 GB, export peak RSS <= 0.5 x the checkpoint's
16-bit weight bytes + 2 GB, INT4 package <= 6 GB. Needs about 16 + 6 GB of free disk in --work.

    python benchmarks/bench_8b.py --work DIR [--block-size 128] [--stages export,run] [--awq-images DIR]

With --awq-images the export chooses AWQ scales for the decoder from those images (the package is then
package-int4-b128-awq).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

VISION = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
          "patch_size": 14, "image_size": 448, "num_channels": 3, "qkv_bias": True, "qk_normalization": False,
          "norm_type": "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu", "model_type": "intern_vit_6b",
          "drop_path_rate": 0.0, "use_flash_attn": False}
LLM = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 4096,
       "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
       "vocab_size": 92553, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
       "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False, "attn_implementation": "eager",
       "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "tie_word_embeddings": False}
SHARD_BYTES = 5 * 1000**3


def _std(name: str, shape: tuple[int, ...]) -> float:
    """Unit-scale activations: 1/sqrt(fan_in) for matrices, unit embeddings, small biases, ~1 norms."""
    if len(shape) >= 2:
        return 1.0 if "emb" in name and "patch" not in name else 1.0 / math.sqrt(math.prod(shape[1:]))
    return 0.02


def _bf16_bytes(name: str, shape: tuple[int, ...], rng: np.random.Generator, rows_per_chunk: int = 4096):
    """Random bf16 values of `shape`, yielded as bytes a few MB at a time (bf16 = the top half of fp32)."""
    std = _std(name, shape)
    rows, cols = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    norm = len(shape) == 1 and not name.endswith("bias")
    for start in range(0, rows, rows_per_chunk):
        n = min(rows_per_chunk, rows - start)
        values = rng.standard_normal((n, cols), dtype=np.float32) * std + (1.0 if norm else 0.0)
        yield (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def write_checkpoint(root: Path, seed: int = 0, vision: dict = VISION, llm: dict = LLM) -> int:
    """Write the checkpoint (safetensors has no streaming writer: headers are computed, data appended); returns
    its weight bytes. `vision` / `llm` are the InternVL chat vision_config / llm_config (InternLM2 or Qwen2)."""
    from fundusrt.models.layouts.internvl_chat import tensor_shapes
    from fundusrt.models.tokenizer import build_tokenizer
    from tokenizers import AddedToken

    root.mkdir(parents=True, exist_ok=True)
    internlm2 = llm["model_type"] == "internlm2"
    shapes = tensor_shapes(vision, llm, internlm2=internlm2)
    shards: list[list[str]] = [[]]
    size = 0
    for name in sorted(shapes):
        nbytes = 2 * math.prod(shapes[name])
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with (root / file).open("wb") as out:
            out.write(len(encoded).to_bytes(8, "little") + encoded)
            for name in names:
                for chunk in _bf16_bytes(name, shapes[name], rng):
                    out.write(chunk)
        weight_map |= dict.fromkeys(names, file)
        total += offset
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                    "weight_map": weight_map}))
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
        "downsample_ratio": 0.5, "force_image_size": 448, "ps_version": "v2", "select_layer": -1,
        "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "pad2square": False, "use_backbone_lora": 0, "use_llm_lora": 0, "tie_word_embeddings": False,
        "hidden_size": llm["hidden_size"], "torch_dtype": "bfloat16", "vision_config": vision, "llm_config": llm,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = build_tokenizer()
    if internlm2:  # InternLM2 prompts start with <s>; Qwen2's have no BOS
        tokenizer.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    (root / "tokenizer.json").write_text(tokenizer.to_str())
    (root / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": internlm2, "bos_token": "<s>"}))
    return total


def timed(command: list[str]) -> dict[str, float]:
    """Wall seconds and peak RSS (GiB) of one child process; raises if it fails."""
    start = time.perf_counter()
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed (exit {os.waitstatus_to_exitcode(status)})")
    return {"wall_s": round(wall, 1), "peak_rss_gib": round(usage.ru_maxrss / 1024**2, 2)}


def _dir_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1024**3, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder for the checkpoint, package and study")
    parser.add_argument("--decoder", default="int4", choices=("int4", "int8"))
    parser.add_argument("--max-tiles", type=int, default=1, help="tiles per image in the package (1: 256 tokens)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128, help="INT4/INT8 weights per quantisation block")
    parser.add_argument("--stages", default="export,run", help="stages to (re)run: export, run")
    parser.add_argument("--awq-images", default=None, help="images for `fundusrt export --awq-images` (default: RTN)")
    args = parser.parse_args()
    work: Path = args.work
    checkpoint, study = work / "checkpoint", work / "study"
    package = work / f"package-{args.decoder}-b{args.block_size}{'-awq' if args.awq_images else ''}"
    stages_wanted = set(args.stages.split(","))
    fundusrt = [sys.executable, "-m", "fundusrt.cli"]
    stages: dict[str, dict[str, float]] = {}
    if not (checkpoint / "config.json").is_file():
        stages["write"] = _write_stage(checkpoint)
    weights_gib = round(sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / 1024**3, 2)
    if "export" in stages_wanted or not (package / "manifest.json").is_file():
        stages["export"] = timed([*fundusrt, "export", str(checkpoint), "--out", str(package), "--force",
                                  "--decoder", args.decoder, "--block-size", str(args.block_size),
                                  "--max-tiles", str(args.max_tiles), "--max-seq-len", "2048",
                                  *(["--awq-images", args.awq_images] if args.awq_images else [])])
    if not study.is_dir():
        subprocess.run([*fundusrt, "synth", "--out", str(study), "--studies", "1"], check=True)
    report = work / "report.json"
    if "run" in stages_wanted:
        stages["run"] = timed([*fundusrt, "run", str(study), "--package", str(package), "--json", str(report),
                               "--question", "Describe the image.", "--max-new-tokens", str(args.max_new_tokens)])
    answers = [a for image in json.loads(report.read_text()).get("images", []) for a in image.get("answers", [])] \
        if "run" in stages else []
    timings = [a.get("timings", {}) for a in answers]
    figures = {
        "checkpoint_gib": weights_gib, "package_gib": _dir_gib(package),
        "export_rss_goal_gib": round(0.5 * weights_gib + 2, 2),
        "stages": stages,
        "answers": [{k: round(v, 1) for k, v in t.items()} for t in timings],
    }
    print(json.dumps(figures, indent=2))
    return 0


def _write_stage(checkpoint: Path) -> dict[str, float]:
    start = time.perf_counter()
    write_checkpoint(checkpoint)
    from fundusrt.bench.machine import peak_rss_mib

    return {"wall_s": round(time.perf_counter() - start, 1), "peak_rss_gib": round(peak_rss_mib() / 1024, 2)}


if __name__ == "__main__":
    sys.exit(main())

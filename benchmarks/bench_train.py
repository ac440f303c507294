"""Training at size: the memory planner for FundusExpert-8B, and a measured LoRA step at FundusExpert-mini shape.

    python benchmarks/bench_train.py plan                      # seconds, no weights
    python benchmarks/bench_train.py measure [--workdir DIR]   # ~2 GiB of disk, a few minutes on 2 cores

`plan` writes the config.json (InternVL 2.5 chat layout, bf16) of FundusExpert-8B (InternViT-300M-448px +
InternLM2.5-7B) with a stand-in tokenizer, and prints `fundusrt train CONFIG --plan`'s figures for LoRA on a
bf16 base, with and without gradient checkpointing, QLoRA (NF4), and 4-GPU DDP / FSDP, each on 1x24GB,
1x80GB and 4x24GB. The micro-batch is one sample per GPU of 4096 tokens with 12 tiles + thumbnail.

`measure` writes a random FundusExpert-mini-shaped checkpoint (InternViT-300M + Qwen2.5-0.5B decoder, bf16,
one 448 px tile per image) and runs two LoRA steps on the same one-sample batch, each path in its own
process: today's fp32 path (base loaded in fp32, no checkpointing), the bf16 base, and the bf16 base with
gradient checkpointing. It reports peak RSS (VmHWM, before the final merge writes anything), the same above the RSS
of the process once torch, transformers and peft are imported, the second step's time, and the planner's CPU
figure for the same run (which leaves out the imports).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

INTERNVIT_300M = {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096,
                  "patch_size": 14, "image_size": 448, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
                  "qkv_bias": True, "qk_normalization": False, "norm_type": "layer_norm", "model_type": "intern_vit_6b"}
INTERNLM2_5_7B = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 4096,
                  "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 92553, "max_position_embeddings": 32768,
                  "rms_norm_eps": 1e-5, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
                  "bias": False, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
QWEN2_5_0_5B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
                "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
                "num_key_value_heads": 2, "vocab_size": 151674, "max_position_embeddings": 32768,
                "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                "use_sliding_window": False}
DEVICES = ("1x24GB", "1x80GB", "4x24GB")


def write_internvl_config(root: Path, llm: dict, max_tiles: int) -> Path:
    """A config-only InternVL 2.5 chat checkpoint folder (config.json, a stand-in tokenizer), bf16."""
    from tokenizers import AddedToken

    from fundusrt.models.tokenizer import build_tokenizer

    root.mkdir(parents=True, exist_ok=True)
    internlm2 = llm["model_type"] == "internlm2"
    config = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "template": "internvl2_5",
              "downsample_ratio": 0.5, "force_image_size": 448, "ps_version": "v2", "select_layer": -1,
              "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
              "max_dynamic_patch": max_tiles, "torch_dtype": "bfloat16", "hidden_size": llm["hidden_size"],
              "vision_config": INTERNVIT_300M, "llm_config": llm}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = build_tokenizer()
    if internlm2:
        tokenizer.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
    (root / "tokenizer.json").write_text(tokenizer.to_str())
    (root / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": internlm2, "bos_token": "<s>"}))
    return root


def train_config(base: Path, out: Path, data: list[str], **settings: object) -> dict:
    return {"output_dir": str(out), "data": {"train": data, "max_seq_len": 4096}, "base": str(base),
            "method": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}, "batch_size": 1, **settings}


def plan_8b(workdir: Path) -> None:
    from fundusrt.training.config import TrainConfig
    from fundusrt.training.planner import Devices, plan

    base = write_internvl_config(workdir / "FundusExpert-8B", INTERNLM2_5_7B, max_tiles=12)
    runs = {
        "LoRA, bf16 base": {},
        "LoRA, bf16 base, checkpointing": {"grad_checkpointing": True},
        "QLoRA (NF4), checkpointing": {"grad_checkpointing": True, "quantize_base": "nf4"},
        "LoRA, FSDP, checkpointing": {"grad_checkpointing": True, "distributed": {"strategy": "fsdp"}},
        "full fine-tune, FSDP, checkpointing": {"method": "full", "grad_checkpointing": True,
                                                 "distributed": {"strategy": "fsdp"}},
    }
    for name, settings in runs.items():
        for text in DEVICES:
            devices = Devices.parse(text)
            config = TrainConfig.from_dict(train_config(base, workdir / "out", ["unused.json"],
                                                        **{**settings, "batch_size": devices.count}))
            print(f"== FundusExpert-8B: {name}")
            print(plan(config, devices).table(), flush=True)


def measure_mini(workdir: Path) -> None:
    from fundusrt.bench.machine import cpu_summary
    from fundusrt.synth.instructions import write_instructions

    base = workdir / "mini"
    if not (base / "model.safetensors").is_file():
        _write_mini(base)
    data = workdir / "data"
    if not data.is_dir():
        write_instructions(data, count=1, seed_start=0, types=("laterality",), sizes=((448, 448),))
    files = [str(p) for p in sorted(data.glob("*.json"))]
    print(f"machine: {cpu_summary()}")
    for name, settings in {"fp32 base (today's path)": {"base_dtype": "fp32"},
                           "bf16 base": {},
                           "bf16 base + checkpointing": {"grad_checkpointing": True}}.items():
        config = train_config(base, workdir / f"out-{name.split()[0]}-{len(settings)}", files, max_steps=2, warmup_steps=1, log_every=1,
                              resume=False, threads=2, **settings)
        path = workdir / "config.json"
        path.write_text(json.dumps(config))
        result = subprocess.run([sys.executable, __file__, "_child", str(path)], capture_output=True, text=True,
                                check=False)
        if result.returncode:
            print(f"{name}: failed\n{result.stderr[-3000:]}")
            continue
        print(f"{name}: {result.stdout.strip()}", flush=True)


def _write_mini(base: Path) -> None:
    """A random FundusExpert-mini-shaped native checkpoint in bf16, one 448 px tile per image."""
    import torch

    from fundusrt.models.layouts import internvl_chat, native
    from fundusrt.models.lvlm import LVLM

    shape = write_internvl_config(base.parent / "mini-config", QWEN2_5_0_5B, max_tiles=1)
    config, tokenizer = internvl_chat.read_config(shape)
    torch.manual_seed(0)
    model = LVLM(config, tokenizer).to(torch.bfloat16)
    native.save(model, base)


def _child(config_path: str) -> None:
    """One training run of config_path; prints peak RSS, step time and the planner's CPU figure as JSON."""
    import torch

    from fundusrt.bench.machine import peak_rss_mib
    from fundusrt.training.config import TrainConfig
    from fundusrt.training.planner import Devices, plan
    from fundusrt.training.trainer import Trainer

    class Measured(Trainer):
        def _finish(self, steps: int, loss: float) -> None:  # the merged checkpoint is not what is measured
            self.peak = peak_rss_mib()

    config = TrainConfig.load(config_path)
    import peft  # noqa: F401  (imported before the baseline, like torch and transformers)

    baseline = _rss_mib()
    trainer = Measured(config, log=lambda line: None)
    trainer.run()
    records = [json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "elapsed_s" in r]
    samples = trainer.prepare(config.data.train, Path(config.output_dir) / "bad.jsonl")
    planned = plan(config, Devices.parse("cpu:24GB"), seq_len=max(len(s.input_ids) for s in samples), tiles=1)
    held = {str(p.dtype) for p in trainer.model.parameters() if not p.requires_grad}
    print(json.dumps({"peak_rss_mib": round(trainer.peak), "above_imports_mib": round(trainer.peak - baseline),
                      "step_s": round(steps[-1]["elapsed_s"] - steps[-2]["elapsed_s"], 1),
                      "loss": steps[-1]["loss"], "frozen_dtypes": sorted(held),
                      "torch_threads": torch.get_num_threads(),
                      "planned_mib": round(planned.total / 2**20),
                      "planned_activations_mib": round((planned.activations_checkpointed if config.grad_checkpointing
                                                        else planned.activations) / 2**20)}))


def _rss_mib() -> float:
    return next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("plan", "measure", "_child"))
    parser.add_argument("config", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help="where checkpoints and runs go (default: a temporary folder)")
    args = parser.parse_args()
    if args.what == "_child":
        _child(args.config)
        return
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        (plan_8b if args.what == "plan" else measure_mini)(workdir)


if __name__ == "__main__":
    main()

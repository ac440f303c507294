"""Training at size on one process: a 16-bit checkpoint stays 16-bit (bytes counted), fp32 compute over it,
gradient checkpointing gives the same gradients, QLoRA is refused on a CPU, and the memory planner's
figures match the measured peak memory of a small run."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from _layout_fixtures import write_internvl_chat

from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, TilingConfig
from fundusrt.models.layouts import native
from fundusrt.models.tiny import build_tiny_model, tiny_config
from fundusrt.models.tokenizer import build_tokenizer
from fundusrt.synth.instructions import write_instructions
from fundusrt.training import cli as train_cli
from fundusrt.training.base import checkpoint_dtype, parameter_bytes
from fundusrt.training.config import TrainConfig
from fundusrt.training.planner import Devices, plan
from fundusrt.training.trainer import Trainer

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train-memory")
    config = dataclasses.replace(tiny_config("siglip-dense", build_tokenizer().get_vocab_size()),
                                 tiling=TilingConfig(policy="single", tile_size=56, mean=SIGLIP_MEAN, std=SIGLIP_STD))
    model = build_tiny_model(config=config, seed=3).to(torch.bfloat16)
    bf16 = native.save(model, root / "bf16")
    fp32 = native.save(model.float(), root / "fp32")  # the same (bf16-exact) values, widened
    data = write_instructions(root / "data", count=2, seed_start=5, types=("laterality",), sizes=((256, 256),))
    return {"root": root, "fp32": fp32, "bf16": bf16, "data": data}


def _config(work: dict[str, Path], base: Path | str, out: str, **overrides) -> TrainConfig:
    settings = {"output_dir": str(work["root"] / out), "base": str(base), "method": "lora", "lora": LORA,
                "data": {"train": [str(work["data"])], "max_seq_len": 1024, "cache_dir": str(work["root"] / "cache")},
                "batch_size": 2, "max_steps": 1, "warmup_steps": 1, "seed": 1, "resume": False, **overrides}
    return TrainConfig.from_dict(settings)


def test_a_bf16_checkpoint_is_trained_over_a_bf16_base(work) -> None:
    assert checkpoint_dtype(work["bf16"]) == torch.bfloat16 and checkpoint_dtype(work["fp32"]) == torch.float32
    trainers = {name: Trainer(_config(work, work[name], name), log=lambda line: None) for name in ("fp32", "bf16")}
    frozen = {name: sum(p.numel() * p.element_size() for p in t.model.parameters() if not p.requires_grad)
              for name, t in trainers.items()}
    assert frozen["bf16"] * 2 == frozen["fp32"], frozen  # the base was never widened to fp32
    held = parameter_bytes(trainers["bf16"].model)
    trained = sum(p.numel() * 4 for p in trainers["bf16"].model.parameters() if p.requires_grad)
    assert held == {"bfloat16": frozen["bf16"], "float32": trained}, held  # LoRA layers (only) in fp32
    assert all("lora_" in n for n, p in trainers["bf16"].model.named_parameters() if p.dtype == torch.float32)
    # on the CPU it computes in fp32: the same loss and gradients as the fp32 base holding the same values
    with torch.no_grad():  # (peft drew the bf16 run's LoRA A in bf16: give both runs the same adapter)
        trained = dict(trainers["bf16"].model.named_parameters())
        for name, param in trainers["fp32"].model.named_parameters():
            if param.requires_grad:
                param.copy_(trained[name])
    samples = trainers["fp32"].prepare([str(work["data"])], work["root"] / "bad.jsonl")
    losses = {name: t.micro_step(samples, np.arange(2), scale=1.0) for name, t in trainers.items()}
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-5), losses
    grads = {name: {n: p.grad for n, p in t.model.named_parameters() if p.requires_grad}
             for name, t in trainers.items()}
    for name, grad in grads["fp32"].items():
        torch.testing.assert_close(grads["bf16"][name], grad, rtol=1e-4, atol=1e-6)
    # training ends with a merged bf16 checkpoint
    result = trainers["bf16"].run()
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}


def test_the_real_internvl_layout_in_bf16_stays_bf16(tmp_path) -> None:
    base = write_internvl_chat(tmp_path / "ivl", internlm2=True)  # FundusExpert-8B layout, bf16 shards
    data = write_instructions(tmp_path / "data", count=1, seed_start=5, types=("laterality",), sizes=((256, 256),))
    config = TrainConfig.from_dict({"output_dir": str(tmp_path / "out"), "base": str(base), "method": "lora",
                                    "lora": {**LORA, "target_modules": ["q_proj", "v_proj"]},
                                    "data": {"train": [str(data)], "max_seq_len": 2048}, "batch_size": 1,
                                    "max_steps": 1, "warmup_steps": 1, "grad_checkpointing": True})
    trainer = Trainer(config, log=lambda line: None)
    assert {p.dtype for p in trainer.model.parameters() if not p.requires_grad} == {torch.bfloat16}
    samples = trainer.prepare(config.data.train, tmp_path / "bad.jsonl")
    assert np.isfinite(trainer.micro_step(samples, np.arange(1), scale=1.0))


def test_gradient_checkpointing_gives_the_same_gradients(work) -> None:
    grads, kept = {}, {}
    for checkpointing in (False, True):
        # full fine-tuning: gradients flow through the vision tower and the decoder, both checkpointed
        trainer = Trainer(_config(work, work["fp32"], f"ckpt-{checkpointing}", method="full",
                                  grad_checkpointing=checkpointing), log=lambda line: None)
        samples = trainer.prepare([str(work["data"])], work["root"] / "bad.jsonl")
        saved: list[int] = []  # bytes autograd keeps for backward (a checkpointed layer keeps its input only)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        trainer.model.train()  # as in Trainer.run: transformers checkpoints in training mode only
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            trainer.micro_step(samples, np.arange(2), scale=1.0)
        grads[checkpointing] = {n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                if p.grad is not None}
        kept[checkpointing] = sum(saved)
    assert kept[True] < 0.5 * kept[False], kept
    assert grads[True].keys() == grads[False].keys()
    assert any(name.startswith("vision.") for name in grads[True])
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_qlora_is_refused_on_a_cpu_before_loading(work) -> None:
    config = _config(work, work["root"] / "no-such-checkpoint", "qlora", quantize_base="nf4", device="cpu")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        Trainer(config, log=lambda line: None)
    with pytest.raises(ValueError, match="needs method 'lora'"):
        _config(work, work["fp32"], "qlora-full", quantize_base="nf4", method="full")


def test_the_plan_is_printed_from_the_config_alone(work, tmp_path, capsys) -> None:
    shape_only = tmp_path / "shape-only"
    base = write_internvl_chat(shape_only, internlm2=True)
    for shard in base.glob("*.safetensors*"):
        shard.unlink()  # the planner reads config.json, never the weights
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path / "out"), "base": str(base), "method": "lora",
                                "data": {"train": ["not-read.json"], "max_seq_len": 512}, "batch_size": 4,
                                "grad_checkpointing": True, "distributed": {"strategy": "fsdp"}}))
    args = train_cli_args(path, plan=True, devices="1x24GB,4x1GB")
    assert train_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "1x24GiB single device: 4 sample(s)" in out and "4x1GiB fsdp: 1 sample(s)" in out
    assert out.count(": fits") == 1 and out.count("does NOT fit") == 1  # 1 GiB GPUs cannot hold a CUDA context
    args = train_cli_args(path, plan=True, devices="24 GB")
    assert train_cli.main(args) == 1


def train_cli_args(config: Path, **overrides) -> object:
    import argparse

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args([str(config)])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


MEASURE = r"""
import json, sys
from pathlib import Path
import peft, torch.distributed.checkpoint.state_dict  # imported before the baseline: not model memory
import transformers.models.qwen2.modeling_qwen2, transformers.models.siglip.modeling_siglip
from fundusrt.bench.machine import peak_rss_mib
from fundusrt.training.config import TrainConfig
from fundusrt.training.trainer import Trainer

def rss_mib():
    return next(int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
                if line.startswith("VmRSS:"))

class Measured(Trainer):
    def _finish(self, steps, loss):
        self.peak = peak_rss_mib()

config = TrainConfig.load(sys.argv[1])
before = rss_mib()
trainer = Measured(config, log=lambda line: None)
trainer.run()
print(json.dumps({"peak_mib": trainer.peak - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="peak RSS is read from /proc (Linux)")
def test_the_planner_matches_the_measured_peak_memory(work, tmp_path) -> None:
    """Full fine-tuning of a small model (weights, gradients, AdamW and activations all sizeable) on the CPU."""
    config = dataclasses.replace(tiny_config("siglip-mlp", build_tokenizer().get_vocab_size()),
                                 tiling=TilingConfig(policy="single", tile_size=56, mean=SIGLIP_MEAN, std=SIGLIP_STD))
    text = dict(config.text.config, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                num_attention_heads=8, num_key_value_heads=4, vocab_size=8192)
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, config=text))
    base = native.save(build_tiny_model(config=config, seed=1), tmp_path / "small")
    # text-only samples of one length, so the planner's worst case is the run's case
    record = {"conversations": [{"from": "human", "value": "Describe the fundus. " * 60},
                                {"from": "gpt", "value": "No diabetic retinopathy. " * 20}]}
    data = tmp_path / "long.json"
    data.write_text(json.dumps([record] * 2))
    config = TrainConfig.from_dict({"output_dir": str(tmp_path / "out"), "base": str(base), "method": "full",
                                    "data": {"train": [str(data)], "max_seq_len": 4096}, "batch_size": 2,
                                    "max_steps": 2, "warmup_steps": 1, "threads": 2, "device": "cpu"})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config.to_dict()))
    done = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    from fundusrt.models import load
    from fundusrt.training.samples import prepare_samples

    model = load(base)
    samples, _ = prepare_samples([data], model.prompt, model.tokenizer, model.config.tiling, max_seq_len=4096,
                                 cache_dir=tmp_path / "cache")
    predicted = plan(config, Devices.parse("cpu:24GB"), seq_len=len(samples[0].input_ids), tiles=0)
    # the weights are memory-mapped from the checkpoint, so they count from the step that first reads them on
    assert measured["peak_mib"] == pytest.approx(predicted.total / 2**20, rel=0.2), (measured, predicted.table())
    assert predicted.activations > 0.25 * predicted.total  # activations are a real part of what is compared


def test_autograd_keeps_16_bit_originals_not_fp32_copies() -> None:
    """fp32 compute over a 16-bit base: the upcast copies die after their module ran, even when the backward
    pass needs them (it widens the 16-bit original again), and the gradients are unchanged."""
    import weakref

    from fundusrt.training.base import Upcast, keep_upcasts_narrow, upcast_frozen

    layer = torch.nn.Linear(64, 64).to(torch.bfloat16).requires_grad_(False)
    assert upcast_frozen(layer) == 2
    copies: list[weakref.ref] = []
    for module in layer.modules():
        if isinstance(module, Upcast):
            module.register_forward_hook(lambda module, args, wide: copies.append(weakref.ref(wide)))
    x = torch.randn(8, 64, requires_grad=True)
    grads = []
    for narrow in (False, True):
        copies.clear()
        if narrow:
            with keep_upcasts_narrow():
                y = layer(x).square().sum()
        else:
            y = layer(x).square().sum()
        alive = [ref() is not None for ref in copies]
        assert alive[0] is not narrow, alive  # the weight (saved for the input's gradient) is kept only when wide
        y.backward()
        grads.append(x.grad.clone())
        x.grad = None
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_plans_scale_with_sharding_batch_and_quantization(tmp_path) -> None:
    base = write_internvl_chat(tmp_path / "ivl", internlm2=True)

    def planned(devices: str, **settings) -> object:
        config = TrainConfig.from_dict({"output_dir": str(tmp_path / "out"), "base": str(base), "method": "lora",
                                        "data": {"train": ["x.json"], "max_seq_len": 512}, "batch_size": 4,
                                        "grad_checkpointing": True, **settings})
        return plan(config, Devices.parse(devices))

    one, ddp, fsdp = planned("1x80GB"), planned("4x80GB"), planned("4x80GB", distributed={"strategy": "fsdp"})
    assert (one.micro_batch, ddp.micro_batch, fsdp.micro_batch) == (4, 1, 1)
    assert ddp.weights == one.weights and ddp.gradients == 2 * one.gradients  # DDP: whole model, bucket copy
    assert fsdp.weights == one.weights // 4 and fsdp.optimizer == one.optimizer // 4 and fsdp.gathered > 0
    assert ddp.activations == fsdp.activations == pytest.approx(one.activations / 4, rel=0.05)
    assert one.activations_checkpointed < one.activations
    nf4 = planned("1x80GB", quantize_base="nf4")
    assert nf4.weights < 0.75 * one.weights and nf4.adapters == one.adapters  # decoder Linears at ~4.1 bits
    fp32 = planned("1x80GB", base_dtype="fp32")
    assert fp32.weights == 2 * one.weights
    with pytest.raises(ValueError, match="not COUNTxMEMORY"):
        Devices.parse("eight GPUs")


def test_the_transformers_spelling_of_checkpointing_is_not_ignored(work) -> None:
    with pytest.raises(ValueError, match="grad_checkpointing"):
        TrainConfig.from_dict({"output_dir": "out", "data": {"train": ["x.json"]}, "base": str(work["fp32"]),
                               "gradient_checkpointing": True})

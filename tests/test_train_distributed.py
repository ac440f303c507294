"""Training under torchrun (gloo, 2 CPU ranks): DDP and FSDP2 give the single-process losses on the same
global batch (two micro-batches per step) and the same adapter, a checkpoint written by 2 ranks resumes
exactly in 1, and DDP all-reduces once per optimizer step, not once per micro-batch."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from safetensors.torch import load_file

from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, TilingConfig
from fundusrt.models.layouts import native
from fundusrt.models.tiny import build_tiny_model, tiny_config
from fundusrt.models.tokenizer import build_tokenizer
from fundusrt.synth.instructions import write_instructions
from fundusrt.training.config import TrainConfig
from fundusrt.training.trainer import train

FUNDUSRT = Path(sys.executable).parent / "fundusrt"
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same LoRA run single-process, with DDP over 2 ranks and with FSDP over 2 ranks."""
    if not TORCHRUN.is_file() or not FUNDUSRT.is_file():
        pytest.skip("torchrun or the fundusrt entry point is not installed next to this Python")
    root = tmp_path_factory.mktemp("distributed")
    config = dataclasses.replace(tiny_config("siglip-dense", build_tokenizer().get_vocab_size()),
                                 tiling=TilingConfig(policy="single", tile_size=56, mean=SIGLIP_MEAN, std=SIGLIP_STD))
    base = native.save(build_tiny_model(config=config, seed=3), root / "base")
    data = write_instructions(root / "data", count=5, seed_start=5, types=("laterality", "referable_dr"),
                              sizes=((256, 256),))
    outputs = {}
    for name in ("single", "ddp", "fsdp"):
        settings = {"output_dir": str(root / name), "base": str(base), "method": "lora", "connector": "full",
                    "data": {"train": [str(data)], "max_seq_len": 1024, "cache_dir": str(root / "cache")},
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                    "lr": 2e-2, "warmup_steps": 1, "batch_size": 3, "grad_accum": 2, "max_steps": STEPS,
                    "save_every": 1,
                    "keep_checkpoints": 3, "log_every": 1, "seed": 1, "threads": 1,
                    "distributed": {"strategy": "fsdp" if name == "fsdp" else "ddp"}}
        path = root / f"{name}.json"
        path.write_text(json.dumps(settings))
        if name == "single":
            train(TrainConfig.load(path), log=lambda line: None)
        else:
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            done = subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python",
                                   str(FUNDUSRT), "train", str(path)], capture_output=True, text=True, env=env,
                                  timeout=300, check=False)
            assert done.returncode == 0, done.stderr[-4000:]
            assert done.stdout.strip() == str(root / name / "merged"), done.stdout  # rank 0 alone prints
        outputs[name] = root / name
    return outputs


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_give_the_single_process_losses(runs, strategy) -> None:
    single, ranked = _losses(runs["single"]), _losses(runs[strategy])
    assert len(single) == len(ranked) == STEPS
    assert ranked == pytest.approx(single, rel=1e-5), (strategy, ranked, single)
    assert single[-1] < single[0]  # it learned something, so equal losses are not equal constants


def test_adapters_are_the_same_across_strategies(runs) -> None:
    ddp, fsdp, single = (_adapter(runs[name]) for name in ("ddp", "fsdp", "single"))
    assert any("lora_B" in name and tensor.abs().max() > 0 for name, tensor in fsdp.items())  # trained away from 0
    assert _max_difference(ddp, fsdp) < 1e-6, _max_difference(ddp, fsdp)
    assert _max_difference(single, fsdp) < 1e-4, _max_difference(single, fsdp)  # Adam magnifies rounding
    # checkpoints are written once, by rank 0, with the world size that wrote them
    state = json.loads((runs["fsdp"] / "checkpoints" / f"step-{STEPS:08d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    merged = load_file(str(runs["fsdp"] / "merged" / "model.safetensors"))
    assert not any("lora_" in name for name in merged)


def test_a_two_rank_checkpoint_resumes_exactly_in_one_process(runs, tmp_path) -> None:
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["fsdp"], resumed, ignore=shutil.ignore_patterns("adapter", "merged"))
    shutil.rmtree(resumed / "checkpoints" / f"step-{STEPS:08d}")  # resume from the step before the last
    metrics = (resumed / "metrics.jsonl").read_text().splitlines()
    (resumed / "metrics.jsonl").write_text("\n".join(metrics[:STEPS - 1]) + "\n")
    settings = json.loads((runs["fsdp"].parent / "fsdp.json").read_text())
    config = TrainConfig.from_dict({**settings, "output_dir": str(resumed), "resume": True})
    lines: list[str] = []
    train(config, log=lines.append)  # no torchrun: one rank
    assert any("resumed from" in line and "written by 2 rank(s)" in line for line in lines), lines
    assert _losses(resumed) == pytest.approx(_losses(runs["fsdp"]), rel=1e-5)
    assert _max_difference(_adapter(resumed), _adapter(runs["fsdp"])) < 1e-6


def _accumulate_under_ddp(rank: int, world_size: int, port: int, out: str) -> None:
    """One rank: three micro-steps of gradient accumulation on a DDP-wrapped Linear, all-reduces counted."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from fundusrt.training.distributed import Ranks, accumulating

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    module = DistributedDataParallel(torch.nn.Linear(4, 2))
    reduces = []

    def counting(state, bucket):
        reduces.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    module.register_comm_hook(dist.group.WORLD, counting)
    ranks = Ranks(rank, world_size, rank, "ddp")
    for micro in range(3):
        with accumulating(module, ranks, last=micro == 2):
            module(torch.full((3, 4), float((rank + 1) * (micro + 1)))).sum().backward()
    torch.save({"reduces": len(reduces), "grad": module.module.weight.grad}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_ddp_all_reduces_once_per_optimizer_step(tmp_path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(_accumulate_under_ddp, args=(2, port, str(tmp_path)), nprocs=2)
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["reduces"] == 1  # one bucket, reduced after the last micro-step only
        # d(sum of outputs)/dW = sum of the inputs over 3 rows and 3 micro-steps, averaged over the ranks
        expected = 3 * (1 + 2 + 3) * (1 + 2) / 2
        torch.testing.assert_close(result["grad"], torch.full((2, 4), expected))

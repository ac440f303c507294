"""Ranks started by `torchrun`: process group, DDP or FSDP2 wrapping, each rank's share of a global batch,
and state dicts that are the same at any world size (full tensors keyed by parameter name).

A run without torchrun's environment is one rank with no process group, so one config file serves
`fundusrt train CONFIG` and `torchrun --nproc-per-node N --no-python fundusrt train CONFIG` alike.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fundusrt.training.config import DistributedConfig

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks (one rank when not started by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str | None = None  # None: a single process, nothing wrapped
    device_type: str = "cpu"  # where collectives' tensors live (nccl needs them on the GPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy is not None

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the ranks (fp64, so sums do not depend on the world size)."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device_type)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def share(self, indices: np.ndarray) -> tuple[np.ndarray, float]:
        """This rank's part of a global batch (every world_size-th sample, as DistributedSampler deals them)
        and the weight of its loss: a rank left without a sample runs the first one with weight 0, so the
        collectives of the forward and backward passes still meet."""
        mine = indices[self.rank::self.world_size]
        return (mine, 1.0) if len(mine) else (indices[:1], 0.0)


def init_ranks(config: DistributedConfig, device_type: str) -> Ranks:
    """Join torchrun's process group, or return a single rank when the process was not started by torchrun."""
    env = {name: os.environ.get(name) for name in TORCHRUN_VARIABLES}
    if env["WORLD_SIZE"] is None:
        return Ranks()
    missing = [name for name, value in env.items() if value is None]
    if missing:
        raise RuntimeError(f"WORLD_SIZE is set but {missing} are not: start distributed runs with torchrun "
                           "(torchrun --nproc-per-node N --no-python fundusrt train CONFIG)")
    backend = config.backend if config.backend != "auto" else ("nccl" if device_type == "cuda" else "gloo")
    if backend == "nccl" and device_type != "cuda":
        raise RuntimeError("distributed.backend 'nccl' needs CUDA GPUs; use 'gloo' (or 'auto') on CPUs")
    ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), config.strategy, device_type)
    if device_type == "cuda":
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return ranks


def close(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def wrap(loss_module: nn.Module, ranks: Ranks, blocks: list[nn.Module], device: torch.device) -> nn.Module:
    """The module to call for the loss: DDP around it, or FSDP2 `fully_shard` on each block then on it.

    `blocks` are the transformer layers (vision and decoder): with FSDP each is one all-gather unit, and
    the rest (embeddings, connector, head) belongs to the root unit.
    """
    if not ranks.active:
        return loss_module
    if ranks.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ranks.local_rank] if device.type == "cuda" else None
        # parts used only by some samples (vision for text-only ones) leave unused parameters
        return DistributedDataParallel(loss_module, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ranks.world_size,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    return loss_module


@contextlib.contextmanager
def accumulating(module: nn.Module, ranks: Ranks, last: bool) -> Iterator[None]:
    """Around one micro-step of gradient accumulation: under DDP, the micro-steps before the `last` keep
    their gradients local (no all-reduce) and the last reduces their sum, one all-reduce per optimizer
    step instead of one per micro-step. FSDP still reduce-scatters every micro-step: skipping it would
    keep unsharded gradients, the memory FSDP is chosen to save."""
    if last or ranks.strategy != "ddp":
        yield
        return
    with module.no_sync():
        yield


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


def trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Full (unsharded, CPU) trainable weights and optimizer state keyed by parameter name, on rank 0
    (other ranks of an FSDP run get empty dicts): the same files whatever the world size."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    weights, optim = get_state_dict(model, optimizer, options=_options(ignore_frozen_params=True))
    return {name: tensor.detach().contiguous() for name, tensor in weights.items()}, optim


def load_trainable_state(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                         optim: dict) -> None:
    """Load full state from `trainable_state` (every rank passes the same dicts) into a model of any world size."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    params = {name for name, p in model.named_parameters() if p.requires_grad}
    unknown, missing = sorted(weights.keys() - params), sorted(params - weights.keys())
    if unknown or missing:
        raise ValueError(f"checkpoint does not fit the model: unknown {unknown[:3]}, missing {missing[:3]}")
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=optim,
                   options=_options(strict=False))


def grad_norm(norm: torch.Tensor) -> float:
    """float() of a clip_grad_norm_ result, which FSDP returns as a (replicated) DTensor."""
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

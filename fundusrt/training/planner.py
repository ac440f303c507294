"""`fundusrt train CONFIG --plan`: bytes per device for a training config, before any weight is loaded.

Parameter figures come from the model built with every tensor fake (torch's FakeTensorMode: shapes and
dtypes, no storage) from the checkpoint's config.json, with the config's LoRA / trainable parts applied.
Activations are what autograd saves for the backward pass, counted by a saved-tensor hook while that fake
model runs one worst-case micro-batch (the config's max_seq_len, as many tiles as fit), so they follow the
real modules rather than a formula, plus the two logits-sized fp32 gradients the backward pass starts
with. With gradient checkpointing each checkpointed layer keeps only its input, plus one layer's saved
tensors while it is recomputed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from fundusrt.config import ModelConfig
from fundusrt.training.config import TrainConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

GIB = 1024**3
# bitsandbytes NF4: 4 bits per weight + one 8-bit absmax per 64 weights + one fp32 per 256 absmax blocks
NF4_BYTES_PER_WEIGHT = (4 + 8 / 64 + 32 / (64 * 256)) / 8
ADAM_BYTES_PER_PARAM = 8  # two fp32 moments
CUDA_CONTEXT_BYTES = GIB  # CUDA context, cuBLAS / NCCL workspaces: about 1 GiB per GPU


@dataclass(frozen=True)
class Devices:
    """`count` devices of `memory` bytes each ("cuda" GPUs or the "cpu")."""

    count: int
    memory: int
    kind: str = "cuda"

    @classmethod
    def parse(cls, text: str) -> Devices:
        """"4x24GB", "1x80GiB" or "cpu:24GB" (GB and GiB both read as 2**30 bytes, as GPU makers use GB)."""
        match = re.fullmatch(r"\s*(?:(\d+)\s*x|(cpu)\s*:)\s*(\d+(?:\.\d+)?)\s*(GB|GiB|G)\s*", text, re.IGNORECASE)
        if not match:
            raise ValueError(f"device spec {text!r} is not COUNTxMEMORY (e.g. 4x24GB) or cpu:MEMORY (e.g. cpu:24GB)")
        count = 1 if match.group(2) else int(match.group(1))
        if count < 1:
            raise ValueError(f"device spec {text!r} names no device")
        return cls(count, int(float(match.group(3)) * GIB), "cpu" if match.group(2) else "cuda")

    def __str__(self) -> str:
        return f"cpu:{self.memory / GIB:g}GiB" if self.kind == "cpu" else f"{self.count}x{self.memory / GIB:g}GiB"


@dataclass
class Plan:
    """Bytes per device of one training configuration."""

    devices: Devices
    strategy: str
    micro_batch: int  # samples per device per micro-step
    seq_len: int
    tiles: int  # image tiles per sample
    weights: int  # the frozen base (16-bit, NF4 or fp32)
    adapters: int  # trainable parameters (fp32)
    gradients: int
    optimizer: int
    gathered: int  # FSDP: the root unit plus two layers unsharded at a time
    activations: int  # without gradient checkpointing
    activations_checkpointed: int
    overhead: int
    checkpointing: bool  # what the config uses

    @property
    def total(self) -> int:
        act = self.activations_checkpointed if self.checkpointing else self.activations
        return (self.weights + self.adapters + self.gradients + self.optimizer + self.gathered + act
                + self.overhead)

    @property
    def fits(self) -> bool:
        return self.total <= self.devices.memory

    def table(self) -> str:
        """The plan as aligned text lines."""
        def gib(value: int) -> str:
            return f"{value / GIB:9.2f} GiB"

        used = "on" if self.checkpointing else "off"
        rows = [
            f"{self.devices} {self.strategy}: {self.micro_batch} sample(s) per device per micro-step, "
            f"{self.seq_len} tokens, {self.tiles} tile(s) per sample",
            f"  weights (frozen base)            {gib(self.weights)}",
            f"  adapters / trained params (fp32) {gib(self.adapters)}",
            f"  gradients (fp32)                 {gib(self.gradients)}",
            f"  optimizer state (AdamW, fp32)    {gib(self.optimizer)}",
        ]
        if self.gathered:
            rows.append(f"  FSDP all-gathered units          {gib(self.gathered)}")
        rows += [
            f"  activations, no checkpointing    {gib(self.activations)}",
            f"  activations, checkpointing       {gib(self.activations_checkpointed)}",
            f"  runtime overhead                 {gib(self.overhead)}",
            f"  {f'total (checkpointing {used})':33}{gib(self.total)} of {self.devices.memory / GIB:.2f} GiB: "
            + ("fits" if self.fits else "does NOT fit"),
        ]
        return "\n".join(rows)


def model_config(config: TrainConfig) -> tuple[ModelConfig, Tokenizer]:
    """The model's config and tokenizer: the checkpoint's (through its layout), or `init_model`'s."""
    if config.base is None:
        from fundusrt.models.tokenizer import build_tokenizer

        return config.model_config(config.tokenizer_vocab_size), build_tokenizer()
    from fundusrt.models.loader import detect_layout, layout_module

    return layout_module(detect_layout(config.base)).read_config(Path(config.base))


def _meta_model(model_config: ModelConfig, tokenizer: Tokenizer, config: TrainConfig) -> nn.Module:
    """The LVLM with parameters on the meta device (no memory) and the config's trainable parts in fp32."""
    from fundusrt.models.loader import parameters_on_meta
    from fundusrt.models.lvlm import LVLM
    from fundusrt.training.adapters import set_trainable
    from fundusrt.training.base import trained_in_fp32

    with parameters_on_meta():
        model = LVLM(model_config, tokenizer)
    set_trainable(model, config)
    trained_in_fp32(model)
    return model


def _fake_parameters(model: nn.Module, frozen_dtype: torch.dtype) -> None:
    """Swap every meta parameter for a fake one (run inside FakeTensorMode): frozen ones in `frozen_dtype`."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            dtype = param.dtype if param.requires_grad else frozen_dtype
            setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=dtype),
                                               requires_grad=param.requires_grad))


class _SavedTensors:
    """Bytes autograd saves for backward, by storage (views and repeats counted once, parameters not)."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {id(p) for p in model.parameters()}
        self.seen: dict[int, torch.Tensor] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in self.params:
            self.seen.setdefault(id(base), base)
        return tensor

    @property
    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.seen.values())


def measure_activations(model: nn.Module, batch: int, seq_len: int, tiles: int,
                        autocast_dtype: torch.dtype | None) -> tuple[int, int]:
    """(saved bytes without checkpointing, with it) of one training forward of `model` (fake tensors).

    Image features take the first tokens of each sequence, as in the prompt; the loss is lm_loss's.
    """
    import torch.nn.functional as F

    from fundusrt.training.adapters import transformer_blocks

    saved = _SavedTensors(model)
    per_layer: list[int] = []
    inputs: list[int] = []

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else next(iter(kwargs.values()))
        per_layer.append(-saved.bytes)
        inputs.append(hidden.numel() * hidden.element_size() if hidden.requires_grad else 0)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        per_layer[-1] += saved.bytes

    blocks = transformer_blocks(model)
    hooks = [block.register_forward_pre_hook(before, with_kwargs=True) for block in blocks]
    hooks += [block.register_forward_hook(after, with_kwargs=True) for block in blocks]
    size = model.config.tiling.tile_size
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), \
                torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            embeds = model.embed(torch.zeros(batch, seq_len, dtype=torch.long))
            if tiles:
                image = model.image_embeds(torch.zeros(batch * tiles, 3, size, size))
                image = image.reshape(batch, -1, image.shape[-1]).to(embeds.dtype)
                embeds = torch.cat([image, embeds[:, image.shape[1]:]], dim=1)
            logits = model.language_model(inputs_embeds=embeds, attention_mask=torch.ones(batch, seq_len,
                                          dtype=torch.long), use_cache=False).logits
            F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                            torch.zeros(batch * (seq_len - 1), dtype=torch.long), reduction="sum")
    finally:
        for hook in hooks:
            hook.remove()
    # the backward pass starts with two fp32 logits-sized gradients (of log-softmax and of the logits) on top
    loss_gradients = 2 * batch * seq_len * logits.shape[-1] * 4
    total = saved.bytes + loss_gradients
    checkpointed = total - sum(per_layer) + sum(inputs) + max(per_layer, default=0)
    return total, checkpointed


def plan(config: TrainConfig, devices: Devices, seq_len: int | None = None, tiles: int | None = None) -> Plan:
    """Bytes per device for `config` on `devices` (see the module docstring).

    Args:
        seq_len: tokens per sample (default: data.max_seq_len).
        tiles: image tiles per sample (default: the tiling's most, with the thumbnail, that fit in seq_len).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fundusrt.training.adapters import transformer_blocks
    from fundusrt.training.base import NAMED_DTYPES, base_dtype

    mcfg, tokenizer = model_config(config)
    gpu = devices.kind == "cuda"
    held = base_dtype(config.base_dtype, config.base)
    precision = config.precision if config.precision != "auto" else ("bf16" if gpu else "fp32")
    autocast = None if precision == "fp32" else NAMED_DTYPES[precision]
    seq_len = seq_len or config.data.max_seq_len
    per_tile = mcfg.tokens_per_tile
    if tiles is None:
        tiling = mcfg.tiling
        most = 1 if tiling.policy == "single" else tiling.max_tiles + int(tiling.use_thumbnail)
        tiles = max(0, min(most, (seq_len - 32) // per_tile))
    world = devices.count
    micro = math.ceil(config.batch_size / world)
    fsdp = config.distributed.strategy == "fsdp" and world > 1
    strategy = (config.distributed.strategy if world > 1 else "single device")
    model = _meta_model(mcfg, tokenizer, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = _frozen_bytes(model, config, held)
    blocks = transformer_blocks(model)
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    root = sum(_param_bytes(p, held) for p in model.parameters() if id(p) not in in_blocks)
    largest = max(sum(_param_bytes(p, held) for p in block.parameters()) for block in blocks)
    with FakeTensorMode(allow_non_fake_inputs=True):
        # activations in the compute dtype: without autocast a 16-bit base computes in fp32
        _fake_parameters(model, held if autocast is not None else torch.float32)
        activations, checkpointed = measure_activations(model, micro, seq_len, tiles, autocast)
    shard = world if fsdp else 1
    return Plan(
        devices=devices, strategy=strategy, micro_batch=micro, seq_len=seq_len, tiles=tiles,
        weights=frozen // shard, adapters=4 * trainable // shard,
        # DDP keeps a second copy of the gradients in its all-reduce buckets
        gradients=4 * trainable // shard * (2 if strategy == "ddp" else 1),
        optimizer=ADAM_BYTES_PER_PARAM * trainable // shard,
        gathered=(root + 2 * largest) * (world - 1) // world if fsdp else 0,
        activations=activations, activations_checkpointed=checkpointed,
        overhead=CUDA_CONTEXT_BYTES if gpu else 0, checkpointing=config.grad_checkpointing)


def _param_bytes(param: nn.Parameter, held: torch.dtype) -> int:
    return param.numel() * (4 if param.requires_grad else held.itemsize)


def _frozen_bytes(model: nn.Module, config: TrainConfig, held: torch.dtype) -> int:
    """Bytes of the frozen parameters as held: 16-bit (or fp32), or NF4 for the decoder layers' Linear weights."""
    nf4 = set()
    if config.quantize_base == "nf4":
        nf4 = {id(m.weight) for m in model.language_model.model.layers.modules() if type(m) is nn.Linear}
    return int(sum(p.numel() * (NF4_BYTES_PER_WEIGHT if id(p) in nf4 else held.itemsize)
                   for p in model.parameters() if not p.requires_grad))

"""The base model held for training at size: in its checkpoint's 16-bit dtype (never materialised in fp32),
or 4-bit NF4 (QLoRA, bitsandbytes, CUDA only); trained parts in fp32.

On a CPU, 16-bit matrix products are slow or inexact, so a 16-bit base computes in fp32 there: every frozen
16-bit tensor gets a torch parametrization that upcasts it where a module reads it, and a saved-tensor hook
makes autograd keep the 16-bit original of any upcast copy the backward pass needs: only the module being
run holds an fp32 copy of its weights.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import parametrize

from fundusrt.models.layouts.common import read_json, tensor_headers

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
CONFIG_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NAMED_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checkpoint_dtype(path: str | Path) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's weights, from the safetensors headers (no tensor
    data read), or from config.json's torch_dtype when the folder holds only the config (planning)."""
    from fundusrt.models.loader import detect_layout, layout_module

    root = Path(path)
    try:
        files = layout_module(detect_layout(root)).weight_files(root)
    except FileNotFoundError:
        config = read_json(root / "config.json")
        name = config.get("torch_dtype") or config.get("dtype") or config.get("llm_config", {}).get("torch_dtype")
        if name not in CONFIG_DTYPES:
            raise ValueError(f"{root} has no weights and its config.json names no torch_dtype of "
                             f"{list(CONFIG_DTYPES)}; set base_dtype in the training config") from None
        return CONFIG_DTYPES[name]
    sizes: Counter[torch.dtype] = Counter()
    for shape, name in tensor_headers(files).values():
        if name in SAFETENSORS_DTYPES:
            sizes[SAFETENSORS_DTYPES[name]] += math.prod(shape)
    if not sizes:
        raise ValueError(f"checkpoint {path} holds no floating-point tensors")
    return sizes.most_common(1)[0][0]


def base_dtype(setting: str, path: str | Path | None) -> torch.dtype:
    """The dtype to hold the base in: `setting` ("auto": the checkpoint's own; fp32 for a model built fresh)."""
    if setting != "auto":
        return NAMED_DTYPES[setting]
    return checkpoint_dtype(path) if path is not None else torch.float32


class Upcast(nn.Module):
    """Parametrization: the stored 16-bit tensor, read as fp32 (the copy remembers what it widens)."""

    def forward(self, stored: torch.Tensor) -> torch.Tensor:
        wide = stored.float()
        wide._upcast_of = stored  # for keep_upcasts_narrow
        return wide


Narrowed = tuple[torch.Tensor, tuple[int, ...], tuple[int, ...], int]


def _pack(tensor: torch.Tensor) -> torch.Tensor | Narrowed:
    # autograd may save the copy itself or a view of it (a transposed weight)
    source = getattr(tensor, "_upcast_of", None)
    if source is None and tensor._base is not None:
        source = getattr(tensor._base, "_upcast_of", None)
    if source is None:
        return tensor
    return source, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()


def _unpack(saved: torch.Tensor | Narrowed) -> torch.Tensor:
    if isinstance(saved, torch.Tensor):
        return saved
    source, size, stride, offset = saved
    return source.float().as_strided(size, stride, offset)


def keep_upcasts_narrow() -> torch.autograd.graph.saved_tensors_hooks:
    """While active, autograd keeps an fp32 copy made by `Upcast` (e.g. a weight the backward pass multiplies
    by) as its 16-bit original and widens it again when the backward pass needs it."""
    return torch.autograd.graph.saved_tensors_hooks(_pack, _unpack)


def upcast_frozen(model: nn.Module) -> int:
    """Make every frozen 16-bit parameter read as fp32 (fp32 compute over a 16-bit base); returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
                parametrize.register_parametrization(module, name, Upcast(), unsafe=True)
                count += 1
    return count


def remove_upcasts(model: nn.Module) -> None:
    """Undo `upcast_frozen`: modules hold their 16-bit tensors as plain parameters again."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations):
                parametrize.remove_parametrizations(module, name, leave_parametrized=False)


def trained_in_fp32(model: nn.Module) -> None:
    """Hold every trainable parameter (LoRA layers, fully trained parts) in fp32, whatever the base dtype."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def quantize_decoder_nf4(model: nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace the decoder layers' nn.Linear modules by bitsandbytes 4-bit NF4 ones (QLoRA), on `device`.

    The embeddings, LM head, norms, vision tower and connector stay 16-bit, as in QLoRA. Returns how many
    Linear modules were quantized.
    """
    if device.type != "cuda":
        raise RuntimeError("quantize_base 'nf4' (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit kernels run on CUDA; "
                           "on this machine set quantize_base to 'none' (a 16-bit base with LoRA)")
    from fundusrt._deps import require

    bnb = require("bitsandbytes", "QLoRA (quantize_base 'nf4')")
    layers = model.language_model.model.layers
    count = 0
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(child.weight.data.to(compute_dtype), requires_grad=False,
                                                 quant_type="nf4", module=quantized)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, name, quantized.to(device))  # moving Params4bit to CUDA quantizes it
            count += 1
    return count


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the model's parameters by dtype name (what holding the model costs)."""
    sizes: Counter[str] = Counter()
    for param in model.parameters():
        sizes[str(param.dtype).removeprefix("torch.")] += param.numel() * param.element_size()
    return dict(sizes)

"""`load(path)`: find the checkpoint's layout, build the model without allocating weights, load them.

The model is built with parameters on the meta device (no random init, no memory), then the
safetensors tensors (memory-mapped by safetensors) are assigned in place of them (gpt-fast style).
Buffers such as rotary frequencies are computed normally, since checkpoints do not store them.
"""

from __future__ import annotations

import importlib
import json
import math
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from fundusrt.models.layouts import LAYOUTS
from fundusrt.models.lvlm import LVLM


class CheckpointError(Exception):
    """A checkpoint is missing, of an unknown layout, or does not match its config."""


def layout_module(name: str) -> ModuleType:
    """The layout module registered under `name` (detect, read_config, weight_files, sanitize)."""
    if name not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint layout {name!r}; known: {list(LAYOUTS)}")
    return importlib.import_module(f"fundusrt.models.layouts.{name}")


def detect_layout(path: str | Path) -> str:
    """Name of the layout of the checkpoint directory `path`."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} is not a directory; pass the folder holding config.json")
    for name in LAYOUTS:
        if layout_module(name).detect(root):
            return name
    raise CheckpointError(f"{root} holds no checkpoint layout fundusrt knows ({', '.join(LAYOUTS)}): expected a "
                          "config.json of a fundusrt native checkpoint (\"format\": \"fundusrt\"), an InternVL chat "
                          "model (model_type internvl_chat), a LLaVA model (mm_vision_tower), or a transformers "
                          "InternVL / LLaVA-OneVision model (model_type internvl / llava_onevision)")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device (buffers stay real) while the block runs."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


# safetensors dtype -> torch dtype of the tensors fundusrt maps.
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class MappedWeights:
    """The memory maps behind a loaded model's tensors.

    Tensors stored in the requested dtype are views of the checkpoint's files (no copy, no RAM of their
    own); the pages they touch count in the process's resident set until `release()` drops them, which
    is what lets an export stream an 8B checkpoint tensor by tensor.
    """

    def __init__(self) -> None:
        self._maps: list[mmap.mmap] = []

    def map(self, file: Path) -> dict[str, torch.Tensor]:
        """Every tensor of one safetensors file, as views of its memory map."""
        with file.open("rb") as handle:
            head, file_size = handle.read(8), os.fstat(handle.fileno()).st_size
            header_len = int.from_bytes(head, "little")
            if len(head) < 8 or 8 + header_len > file_size:
                raise CheckpointError(f"{file} is not a valid safetensors file: its header length does not fit "
                                      f"its {file_size} bytes (truncated, or another format)")
            try:
                header = json.loads(handle.read(header_len))
            except (ValueError, UnicodeDecodeError) as exc:
                raise CheckpointError(f"{file} is not a valid safetensors file: unreadable header ({exc})") from exc
            # ACCESS_COPY: private pages, so torch gets a writable buffer while the file is never written.
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
        self._maps.append(mapped)
        base, size = 8 + header_len, len(mapped)
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (start, end) = _SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], entry["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{file}: tensor {name!r} has an entry fundusrt cannot map: {entry}") from exc
            count = math.prod(shape)
            if base + end > size or end - start != count * torch.empty((), dtype=dtype).element_size():
                raise CheckpointError(f"{file} is truncated or corrupt: tensor {name!r} ({entry['dtype']} {shape}) "
                                      f"does not fit bytes {start}..{end} of a {size - base}-byte data section")
            flat = torch.frombuffer(mapped, dtype=dtype, count=count, offset=base + start) if count else \
                torch.empty(0, dtype=dtype)
            tensors[name] = flat.reshape(shape)
        return tensors

    def release(self) -> None:
        """Drop the mapped pages from this process's resident set (they are re-read from the file if used)."""
        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)


def _read_weights(files: list[Path], dtype: torch.dtype | None, store: MappedWeights) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weights file {file} is missing")
        for key, tensor in store.map(file).items():
            convert = dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype
            weights[key] = tensor.to(dtype) if convert else tensor
    return weights


def load(path: str | Path, dtype: torch.dtype | None = torch.float32, layout: str | None = None,
         attn_implementation: str = "sdpa") -> LVLM:
    """Load a checkpoint directory into an `LVLM` in eval mode.

    Args:
        path: checkpoint directory.
        dtype: floating-point dtype of the loaded weights; None keeps each tensor's stored dtype. Tensors
            already in this dtype are memory-mapped from the files, not copied (`model.mapped_weights`).
        layout: layout name; detected from the files when None.
        attn_implementation: transformers attention backend ("sdpa" or "eager").
    """
    root = Path(path)
    module = layout_module(layout or detect_layout(root))
    try:
        config, tokenizer = module.read_config(root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the config of checkpoint {root}: {exc}") from exc
    with parameters_on_meta():
        model = LVLM(config, tokenizer, attn_implementation)
    store = MappedWeights()
    try:
        files = module.weight_files(root)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot find the weights of checkpoint {root}: {exc}") from exc
    try:
        weights = module.sanitize(_read_weights(files, dtype, store), config)
    except ValueError as exc:
        raise CheckpointError(f"cannot map the tensors of checkpoint {root}: {exc}") from exc
    mismatch = compare_weights(model, weights)
    if mismatch.missing or mismatch.unexpected:
        raise CheckpointError(f"checkpoint {root} does not match its config: missing {_first(mismatch.missing)}, "
                              f"unexpected {_first(mismatch.unexpected)}")
    if mismatch.wrong_shape:
        raise CheckpointError(f"checkpoint {root} has tensors of the wrong shape (name, file, config): "
                              f"{_first(mismatch.wrong_shape)}")
    model.load_state_dict(weights, strict=False, assign=True)
    model.mapped_weights = store
    return model.eval()


@dataclass
class WeightMismatch:
    """How a checkpoint's (sanitized) tensors differ from what the model built from its config expects."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)


def _first(items: list, count: int = 5) -> str:
    return f"{items[:count]}{' ...' if len(items) > count else ''}"


def compare_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> WeightMismatch:
    """Missing, unexpected and wrong-shape (name, file shape, model shape) tensors, each sorted by name."""
    params = dict(model.named_parameters())
    return WeightMismatch(
        missing=sorted(params.keys() - weights.keys()),
        unexpected=sorted(weights.keys() - set(model.state_dict())),
        wrong_shape=[(k, tuple(weights[k].shape), tuple(p.shape)) for k, p in sorted(params.items())
                     if k in weights and tuple(weights[k].shape) != tuple(p.shape)],
    )

"""`load(path)`: find the checkpoint's layout, build the model without allocating weights, load them.

The model is built with parameters on the meta device (no random init, no memory), then the
safetensors tensors (memory-mapped by safetensors) are assigned in place of them (gpt-fast style).
Buffers such as rotary frequencies are computed normally, since checkpoints do not store them.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from fundusrt.models.layouts import LAYOUTS
from fundusrt.models.lvlm import LVLM


class CheckpointError(Exception):
    """A checkpoint is missing, of an unknown layout, or does not match its config."""


def _layout_module(name: str) -> ModuleType:
    if name not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint layout {name!r}; known: {list(LAYOUTS)}")
    return importlib.import_module(f"fundusrt.models.layouts.{name}")


def detect_layout(path: str | Path) -> str:
    """Name of the layout of the checkpoint directory `path`."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint {root} is not a directory; pass the folder holding config.json")
    for name in LAYOUTS:
        if _layout_module(name).detect(root):
            return name
    raise CheckpointError(f"{root} holds no checkpoint layout fundusrt knows ({', '.join(LAYOUTS)}): "
                          "expected config.json with \"format\": \"fundusrt\"; write one with "
                          "fundusrt.models.tiny.write_tiny_checkpoint or a layout converter")


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
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


def _read_weights(files: list[Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError, safe_open

    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weights file {file} is missing")
        try:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = f.get_tensor(key)
                    weights[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a valid safetensors file: {exc}") from exc
    return weights


def load(path: str | Path, dtype: torch.dtype = torch.float32, layout: str | None = None,
         attn_implementation: str = "sdpa") -> LVLM:
    """Load a checkpoint directory into an `LVLM` in eval mode.

    Args:
        path: checkpoint directory.
        dtype: floating-point dtype of the loaded weights.
        layout: layout name; detected from the files when None.
        attn_implementation: transformers attention backend ("sdpa" or "eager").
    """
    root = Path(path)
    module = _layout_module(layout or detect_layout(root))
    try:
        config, tokenizer = module.read_config(root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the config of checkpoint {root}: {exc}") from exc
    with _parameters_on_meta():
        model = LVLM(config, tokenizer, attn_implementation)
    weights = module.sanitize(_read_weights(module.weight_files(root), dtype), config)
    expected = {name for name, _ in model.named_parameters()}
    missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - set(model.state_dict()))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {root} does not match its config: missing {missing[:5]}"
                              f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    shapes = [(k, tuple(weights[k].shape), tuple(p.shape)) for k, p in model.named_parameters()
              if tuple(weights[k].shape) != tuple(p.shape)]
    if shapes:
        raise CheckpointError(f"checkpoint {root} has tensors of the wrong shape (name, file, config): {shapes[:5]}")
    model.load_state_dict(weights, strict=False, assign=True)
    return model.eval()

"""The native fundusrt checkpoint: config.json (ModelConfig + "format": "fundusrt"), model.safetensors
with prefixes vision./connector./language_model., and tokenizer.json (tokenizers library)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fundusrt.config import ModelConfig
from fundusrt.manifest import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from fundusrt.models.lvlm import LVLM

NAME = "native"
FORMAT = "fundusrt"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def detect(path: Path) -> bool:
    """True when `path/config.json` says `"format": "fundusrt"`."""
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def read_config(path: Path) -> tuple[ModelConfig, Tokenizer]:
    """The model config and tokenizer of a native checkpoint."""
    from tokenizers import Tokenizer

    config = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    tokenizer_path = path / TOKENIZER_FILE
    if not tokenizer_path.is_file():
        raise FileNotFoundError(f"{tokenizer_path} is missing; a native checkpoint needs its tokenizer.json")
    return config, Tokenizer.from_file(str(tokenizer_path))


def weight_files(path: Path) -> list[Path]:
    return [path / WEIGHTS_FILE]


def sanitize(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Native names are already the model's names."""
    return weights


def save(model: LVLM, out_dir: str | Path) -> Path:
    """Write `model` as a native checkpoint into `out_dir` (created if needed); each file atomically."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    atomic_write_bytes(out / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    atomic_write_text(out / TOKENIZER_FILE, model.tokenizer.to_str())
    config = {"format": FORMAT, **model.config.to_dict()}
    atomic_write_text(out / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return out

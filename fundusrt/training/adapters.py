"""What trains: LoRA (peft) on the decoder's projections, optionally the connector and the last vision
blocks (fully or with LoRA); saving, re-applying and merging adapters.

peft's `inject_adapter_in_model` works on our plain `nn.Module` LVLM (no PeftModel wrapper), so the
module names, and with them the native checkpoint names, stay what `fundusrt.models` expects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fundusrt.manifest import atomic_write_bytes, atomic_write_text
from fundusrt.models.lvlm import LVLM
from fundusrt.training.config import LoraSettings, TrainConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_NAME = "default"


def vision_blocks(model: LVLM) -> nn.ModuleList:
    """The vision tower's encoder blocks (SigLIP `encoder.layers`, InternViT `encoder.layer`)."""
    for _, module in model.vision.named_modules():
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError("the vision tower has no block list to train")


def transformer_blocks(model: LVLM) -> list[nn.Module]:
    """The decoder layers and vision blocks: the units of checkpointing, FSDP sharding and the planner's count."""
    return [*model.language_model.model.layers, *vision_blocks(model)]


def _linear_names(model: nn.Module, prefix: str, suffixes: tuple[str, ...] | None) -> list[str]:
    """Full names of nn.Linear modules under `prefix` (ending in one of `suffixes`, if given)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name.startswith(prefix)
            and (suffixes is None or name.rsplit(".", 1)[-1] in suffixes)]


def lora_targets(model: LVLM, config: TrainConfig) -> list[str]:
    """Full module names that get LoRA: decoder layer projections, plus connector / vision blocks if asked."""
    decoder_prefix = "language_model.model.layers."
    targets = _linear_names(model, decoder_prefix, tuple(config.lora.target_modules))
    if not targets:
        raise ValueError(f"no decoder projection matches lora.target_modules {config.lora.target_modules}")
    if config.connector == "lora":
        targets += _linear_names(model, "connector.", None)
    if config.vision_blocks and config.vision_mode == "lora":
        targets += _block_linear_names(model, config.vision_blocks)
    return targets


def _block_linear_names(model: LVLM, count: int) -> list[str]:
    blocks = vision_blocks(model)
    if count > len(blocks):
        raise ValueError(f"vision_blocks={count} but the tower has {len(blocks)} blocks")
    keep = {id(m) for block in list(blocks)[-count:] for m in block.modules()}
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and id(module) in keep]


def lora_config(settings: LoraSettings, targets: list[str]) -> Any:
    """The peft LoraConfig for `targets` (exact module names)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias="none")


def set_trainable(model: LVLM, config: TrainConfig) -> list[str]:
    """Make exactly the configured parts trainable (injecting LoRA layers as needed).

    Returns:
        the LoRA target module names (empty for full fine-tuning).
    """
    if config.method == "full":
        model.requires_grad_(True)
        if config.freeze_vision:
            model.vision.requires_grad_(False)
            model.connector.requires_grad_(False)
        return []
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    targets = lora_targets(model, config)
    inject_adapter_in_model(lora_config(config.lora, targets), model, adapter_name=ADAPTER_NAME)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    if config.connector == "full":
        model.connector.requires_grad_(True)
    if config.vision_blocks and config.vision_mode == "full":
        for block in list(vision_blocks(model))[-config.vision_blocks:]:
            block.requires_grad_(True)
    return targets


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by name (what an adapter or a resumable checkpoint stores)."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: LVLM, out_dir: Path, targets: list[str], settings: LoraSettings, base: str) -> Path:
    """Write the LoRA weights and fully trained parts with the LoRA config and the base checkpoint path."""
    from safetensors.torch import save

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / ADAPTER_WEIGHTS, save(trainable_state(model), metadata={"format": "pt"}))
    atomic_write_text(out_dir / ADAPTER_CONFIG, json.dumps({
        "peft_type": "LORA", "base_checkpoint": base, "r": settings.r, "lora_alpha": settings.alpha,
        "lora_dropout": settings.dropout, "target_modules": targets,
    }, indent=2) + "\n")
    return out_dir


def apply_adapter(model: LVLM, adapter_dir: str | Path) -> LVLM:
    """Inject the LoRA layers of a saved adapter into `model` and load its weights (strictly)."""
    from peft import inject_adapter_in_model
    from safetensors.torch import load_file

    root = Path(adapter_dir)
    meta = json.loads((root / ADAPTER_CONFIG).read_text())
    settings = LoraSettings(r=meta["r"], alpha=meta["lora_alpha"], dropout=meta["lora_dropout"])
    inject_adapter_in_model(lora_config(settings, meta["target_modules"]), model, adapter_name=ADAPTER_NAME)
    weights = load_file(str(root / ADAPTER_WEIGHTS))
    params = dict(model.named_parameters())
    unknown = sorted(set(weights) - set(params))
    missing = sorted(n for n in params if "lora_" in n and n not in weights)
    if unknown or missing:
        raise ValueError(f"adapter {root} does not fit the model: unknown {unknown[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor)
    return model.eval()


def merge_adapters(model: LVLM) -> LVLM:
    """Fold every LoRA layer into its base Linear and remove the LoRA modules (in place)."""
    from peft.tuners.lora import LoraLayer

    lora_modules = [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    for name, module in lora_modules:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())
    model.requires_grad_(False)
    return model.eval()

"""Tiny random checkpoints in the native layout, for tests and the demo.

Shapes are small (tiles of 56-64 px, 4 vision layers, hidden 64) but every code path of the real
families runs. Weights are drawn larger than a training init so that greedy decoding of a random
model produces varied tokens with clear argmax margins instead of one repeated token.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fundusrt.config import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_MEAN,
    SIGLIP_STD,
    ConnectorConfig,
    ModelConfig,
    TextConfig,
    TilingConfig,
    VisionConfig,
)
from fundusrt.models.layouts import native
from fundusrt.models.lvlm import LVLM
from fundusrt.models.tokenizer import build_tokenizer

FAMILIES = ("siglip-dense", "internvit-shuffle", "siglip-mlp")


def tiny_text_config(vocab_size: int) -> TextConfig:
    """A 2-layer Qwen2 decoder with grouped-query attention (4 heads, 2 KV heads)."""
    return TextConfig(type="qwen2", config={
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
    })


def tiny_config(family: str, vocab_size: int) -> ModelConfig:
    """The ModelConfig of a tiny `family` checkpoint (see FAMILIES)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    if family.startswith("siglip"):
        # 56 px tiles of 8 px patches: 49 tokens per tile, no CLS.
        vision = VisionConfig(type="siglip", hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                              image_size=56, patch_size=8)
        connector = (ConnectorConfig(type="dense", feature_layer=-1, layer_groups=[[0, 1], [2, 3]])
                     if family == "siglip-dense" else ConnectorConfig(type="mlp", feature_layer=-1))
        tiling = TilingConfig(policy="anyres", tile_size=56, max_tiles=4, use_thumbnail=True,
                              grid_pinpoints=[(56, 112), (112, 56), (112, 112)], mean=SIGLIP_MEAN, std=SIGLIP_STD)
    else:
        # 64 px tiles of 8 px patches: 8x8 grid + CLS, shuffled to 16 tokens per tile.
        vision = VisionConfig(type="internvit", hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128,
                              image_size=64, patch_size=8, qkv_bias=True)
        connector = ConnectorConfig(type="pixel_shuffle", feature_layer=-1, downsample_ratio=0.5)
        tiling = TilingConfig(policy="internvl_dynamic", tile_size=64, min_tiles=1, max_tiles=6, use_thumbnail=True,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return ModelConfig(vision=vision, connector=connector, text=tiny_text_config(vocab_size), tiling=tiling,
                       name=f"tiny-{family}", family=family)


@torch.no_grad()
def scale_init(model: LVLM, generator: torch.Generator) -> None:
    """Redraw weights so a random model decodes varied tokens with clear argmax margins.

    Matrices get std 1/sqrt(fan_in) (activations keep unit scale through the layers instead of fading
    to the near-uniform logits of a 0.02 init); embeddings std 1; the LM head std 2/sqrt(hidden) so
    logits spread over several units; norms stay at 1 and biases small.
    """
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            fan_in = param[0].numel()
            std = 1.0 / fan_in**0.5
            if name.endswith("embed_tokens.weight"):
                std = 1.0
            elif name.endswith("lm_head.weight"):
                std = 2.0 / fan_in**0.5
            param.copy_(torch.randn(param.shape, generator=generator) * std)
        elif name.endswith("bias"):
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def build_tiny_model(family: str = "siglip-dense", *, seed: int = 0, config: ModelConfig | None = None) -> LVLM:
    """A tiny random LVLM in memory (`config` overrides the family's default tiny config)."""
    tokenizer = build_tokenizer()
    config = config or tiny_config(family, tokenizer.get_vocab_size())
    torch.manual_seed(seed)
    model = LVLM(config, tokenizer)
    scale_init(model, torch.Generator().manual_seed(seed))
    return model.eval()


def write_tiny_checkpoint(out_dir: str | Path, *, family: str = "siglip-dense", seed: int = 0) -> Path:
    """Write a tiny random native checkpoint of `family` into `out_dir` and return its path."""
    return native.save(build_tiny_model(family, seed=seed), out_dir)

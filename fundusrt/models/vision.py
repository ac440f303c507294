"""Vision towers built from transformers classes, returning every hidden state the connector may need."""

from __future__ import annotations

import torch
from torch import nn

from fundusrt.config import VisionConfig


def build_vision_tower(config: VisionConfig, attn_implementation: str = "sdpa") -> nn.Module:
    """A transformers `SiglipVisionModel` (no pooling head) or `InternVLVisionModel` for `config`."""
    from transformers import InternVLVisionConfig, InternVLVisionModel, SiglipVisionConfig, SiglipVisionModel

    if config.type == "siglip":
        hf_config = SiglipVisionConfig(
            hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size,
            image_size=config.image_size,
            patch_size=config.patch_size,
            layer_norm_eps=config.layer_norm_eps,
            hidden_act=config.hidden_act,
            vision_use_head=False,
        )
        hf_config._attn_implementation = attn_implementation
        return SiglipVisionModel(hf_config)
    hf_config = InternVLVisionConfig(
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        intermediate_size=config.intermediate_size,
        image_size=[config.image_size, config.image_size],
        patch_size=[config.patch_size, config.patch_size],
        layer_norm_eps=config.layer_norm_eps,
        hidden_act=config.hidden_act,
        attention_bias=config.qkv_bias,
        use_qk_norm=config.qk_norm,
        norm_type=config.norm_type,
    )
    hf_config._attn_implementation = attn_implementation
    return InternVLVisionModel(hf_config)


def vision_hidden_states(tower: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """All hidden states of `tower` for (num_tiles, 3, S, S) pixels: index 0 is the embedding output.

    Entries are taken before SigLIP's post-layernorm, as LLaVA-OneVision and the Dense Connector do.
    """
    return tuple(tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states)

"""nn.Modules with the exact I/O of each package component, for `torch.onnx.export`."""

from __future__ import annotations

import torch
from torch import nn

from fundusrt.models.lvlm import LVLM


class VisionComponent(nn.Module):
    """pixel_values (num_tiles, 3, S, S) -> vision_features (num_tiles, T_in, C_in)."""

    def __init__(self, model: LVLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_features(pixel_values)


class ConnectorComponent(nn.Module):
    """vision_features -> image_embeds (num_tiles, tokens_per_tile, hidden)."""

    def __init__(self, model: LVLM) -> None:
        super().__init__()
        self.connector = model.connector

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        return self.connector(vision_features)


class EmbedComponent(nn.Module):
    """input_ids (batch, seq) -> inputs_embeds (batch, seq, hidden) in the activations' dtype.

    The table may be stored narrower than the activations (a bf16 checkpoint's table in an fp32 package):
    rows are cast after the lookup, which is exact and keeps the largest tensor of a package at half size.
    """

    def __init__(self, model: LVLM, dtype: torch.dtype) -> None:
        super().__init__()
        self.embed_tokens = model.language_model.get_input_embeddings()
        self.dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids).to(self.dtype)


class DecoderComponent(nn.Module):
    """inputs_embeds, attention_mask, position_ids, flat past K/V -> last-position logits, flat present K/V.

    The cache is rebuilt from the flat tensors on every call, which is what lets the dynamo exporter
    trace transformers' DynamicCache; an empty past is fed as length-0 tensors.
    """

    def __init__(self, model: LVLM) -> None:
        super().__init__()
        self.model = model
        self.num_layers = model.config.text.num_layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]
        cache = DynamicCache(pairs, config=self.model.language_model.config)
        logits, cache = self.model.decoder_step(inputs_embeds, attention_mask, position_ids, cache)
        present: list[torch.Tensor] = []
        for layer in cache.layers:
            present += [layer.keys, layer.values]
        return (logits.float(), *present)

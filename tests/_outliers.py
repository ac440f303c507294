"""Outlier input channels for AWQ tests, without changing the model's float function."""

from __future__ import annotations

from typing import Any


def add_outlier_channels(model: Any, channels: int = 4, factor: float = 20.0) -> None:
    """Make `channels` decoder input channels outliers in place: norm weights x factor, their readers / factor.

    LLMs route a few channels through activations tens of times larger than the rest, with small weights
    (the case AWQ is for); tiny and demo models have none.
    """
    import torch

    with torch.no_grad():
        for layer in model.language_model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[:channels] *= factor
                for linear in readers:
                    linear.weight[:, :channels] /= factor

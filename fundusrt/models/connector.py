"""Connectors: vision hidden states -> language-model embeddings.

Each connector splits into a parameter-free `select` (which hidden states, averaged how, CLS dropped)
and a learned `forward`. The exporter puts `select` into vision.onnx so that the vision component
emits one tensor, and `forward` into connector.onnx.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fundusrt.config import ConnectorConfig, ModelConfig


class Connector(nn.Module):
    """Linear-GELU-Linear on one hidden state (LLaVA `mlp2x_gelu`)."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, text_hidden: int, has_cls: bool) -> None:
        super().__init__()
        self.config = config
        self.has_cls = has_cls
        self.linear_1 = nn.Linear(config.feature_width(vision_hidden), text_hidden)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text_hidden, text_hidden)

    def select(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """(num_tiles, tokens, C_in) features from the tower's hidden states, CLS dropped."""
        return self._drop_cls(hidden_states[self.config.feature_layer])

    def _drop_cls(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 1:] if self.has_cls else features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(num_tiles, tokens, C_in) -> (num_tiles, tokens_per_tile, text_hidden)."""
        return self.linear_2(self.act(self.linear_1(features)))


class DenseConnector(Connector):
    """EyecareGPT's layer-wise dense connector (Dense Connector `dci` generalised to k groups).

    Features are the channel concat [hidden_states[feature_layer], mean(group_1), ..., mean(group_k)],
    the order of the Dense Connector code (base first), then Linear-GELU-Linear.
    """

    def select(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        parts = [hidden_states[self.config.feature_layer]]
        parts += [torch.stack([hidden_states[i] for i in group]).mean(dim=0) for group in self.config.layer_groups]
        return self._drop_cls(torch.cat(parts, dim=-1))


class PixelShuffleConnector(Connector):
    """InternVL `mlp1`: pixel shuffle (v2 order), then LayerNorm(eps 1e-5)-Linear-GELU-Linear."""

    def __init__(self, config: ConnectorConfig, vision_hidden: int, text_hidden: int, has_cls: bool) -> None:
        super().__init__(config, vision_hidden, text_hidden, has_cls)
        self.layer_norm = nn.LayerNorm(config.feature_width(vision_hidden), eps=1e-5)

    def shuffle(self, features: torch.Tensor) -> torch.Tensor:
        """(n, g*g, C) -> (n, (g/k)^2, k*k*C): output cell (i, j) concatenates the k x k patch block at
        rows k*i.., columns k*j.. in row-major order (InternVL ps_version v2)."""
        n, tokens, channels = features.shape
        k = self.config.shuffle_factor
        side = int(round(tokens**0.5))
        grid = features.reshape(n, side // k, k, side // k, k, channels)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, (side // k) ** 2, k * k * channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(self.layer_norm(self.shuffle(features)))


def build_connector(config: ModelConfig) -> Connector:
    """The connector of `config` (input width from the tower, output width of the decoder)."""
    cls = {"mlp": Connector, "dense": DenseConnector, "pixel_shuffle": PixelShuffleConnector}[config.connector.type]
    return cls(config.connector, config.vision.hidden_size, config.text.hidden_size, config.vision.has_cls)

"""PyTorch reference of LLaVA-NeXT's `spatial_unpad` image assembly (shared reference 2.4 / 4.5).

The runtime has its own NumPy implementation (`fundusrt.runtime.assembly`); tests hold both to
transformers' LLaVA-OneVision `pack_image_features`.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F


def unpad(feature_map: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """LLaVA `unpad_image` on a (C, Hc, Wc) map of a `width` x `height` source (int() truncation)."""
    _, map_height, map_width = feature_map.shape
    if width / height > map_width / map_height:
        pad = (map_height - int(height * (map_width / width))) // 2
        return feature_map[:, pad:map_height - pad]
    pad = (map_width - int(width * (map_height / height))) // 2
    return feature_map[:, :, pad:map_width - pad]


def anyres_unpad(image_embeds: torch.Tensor, grid: tuple[int, int], source_size: tuple[int, int],
                 image_newline: torch.Tensor, max_tiles: int = 0) -> torch.Tensor:
    """(1 + cols*rows, tokens, hidden) of one image (global view first) -> (n, hidden) prompt tokens.

    Args:
        grid: (cols, rows) of the anyres grid.
        source_size: (width, height) of the image the tiles were cut from.
        image_newline: (hidden,) appended to every feature row.
        max_tiles: LLaVA-OneVision anyres_max_N; 0 disables the bilinear shrink.
    """
    cols, rows = grid
    side = math.isqrt(image_embeds.shape[1])
    hidden = image_embeds.shape[-1]
    tiles = image_embeds[1:].reshape(rows, cols, side, side, hidden)
    feature_map = tiles.permute(4, 0, 2, 1, 3).reshape(hidden, rows * side, cols * side)
    feature_map = unpad(feature_map, *source_size)
    _, height, width = feature_map.shape
    ratio = math.sqrt(height * width / (max_tiles * side**2)) if max_tiles else 0.0
    if ratio > 1.1:
        feature_map = F.interpolate(feature_map[None], [int(height // ratio), int(width // ratio)],
                                    mode="bilinear")[0]
    newline = image_newline.to(feature_map.dtype)[:, None, None].expand(hidden, feature_map.shape[1], 1)
    grid_tokens = torch.cat([feature_map, newline], dim=-1).flatten(1, 2).transpose(0, 1)
    return torch.cat([image_embeds[0], grid_tokens], dim=0)

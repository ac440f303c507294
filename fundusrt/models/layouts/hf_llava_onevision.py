"""transformers-native `LlavaOnevisionForConditionalGeneration` directories (shared reference 3.4).

SigLIP tower (no head), `multi_modal_projector.linear_{1,2}`, `image_newline`, a Qwen2 LLM; anyres
tiling with `image_grid_pinpoints` stored as [height, width]; features assembled by spatial_unpad with
the "anyres_max_N" shrink. A list `vision_feature_layer` ([-1, a, b]) concatenates layers on channels,
which is fundusrt's dense connector with one-layer groups.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, ConnectorConfig, ModelConfig, TextConfig, TilingConfig, VisionConfig
from fundusrt.models.layouts.common import (
    CONFIG_FILE,
    config_json,
    load_tokenizer,
    read_json,
    safetensors_files,
    text_config,
)
from fundusrt.models.layouts.hf_internvl import sanitize as _hf_sanitize

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

NAME = "hf_llava_onevision"


def detect(path: Path) -> bool:
    """True for config.json with model_type "llava_onevision"."""
    return config_json(path).get("model_type") == "llava_onevision"


def read_config(path: Path) -> tuple[ModelConfig, Tokenizer]:
    """ModelConfig and tokenizer of a LlavaOnevisionForConditionalGeneration directory."""
    config = read_json(path / CONFIG_FILE)
    vc, tc = config["vision_config"], config["text_config"]
    if config.get("vision_feature_select_strategy", "full") != "full":
        raise ValueError("SigLIP has no CLS token: only vision_feature_select_strategy 'full' is supported")
    vision = VisionConfig(
        type="siglip", hidden_size=vc["hidden_size"], num_layers=vc["num_hidden_layers"],
        num_heads=vc["num_attention_heads"], intermediate_size=vc["intermediate_size"], image_size=vc["image_size"],
        patch_size=vc["patch_size"], layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        hidden_act=vc.get("hidden_act", "gelu_pytorch_tanh"))
    layers = config.get("vision_feature_layer", -1)
    layers = layers if isinstance(layers, list) else [layers]
    connector = ConnectorConfig(type="dense" if len(layers) > 1 else "mlp", feature_layer=int(layers[0]),
                                layer_groups=[[int(i)] for i in layers[1:]])
    tile = vision.image_size
    pinpoints = [(int(w), int(h)) for h, w in config.get("image_grid_pinpoints") or []]
    aspect = re.fullmatch(r"anyres_max_(\d+)", str(config.get("vision_aspect_ratio", "anyres_max_9")))
    tiling = TilingConfig(policy="anyres", tile_size=tile, max_tiles=max(w * h for w, h in pinpoints) // tile**2,
                          use_thumbnail=True, grid_pinpoints=pinpoints, mean=SIGLIP_MEAN, std=SIGLIP_STD)
    tokenizer = load_tokenizer(path, "Save one with transformers: AutoTokenizer.from_pretrained(CHECKPOINT)"
                                     ".save_pretrained(CHECKPOINT).")
    image_token = tokenizer.id_to_token(int(config.get("image_token_index", 151646)))
    if image_token is None:
        raise ValueError(f"image_token_index {config.get('image_token_index')} is not in the tokenizer")
    model_config = ModelConfig(
        vision=vision, connector=connector,
        text=TextConfig(type=tc.get("model_type", "qwen2"), config=text_config(
            tc, tie_word_embeddings=bool(config.get("tie_word_embeddings", False)))),
        tiling=tiling, name=path.resolve().name, family="llava_onevision", chat_template="chatml",
        system_message="You are a helpful assistant.", image_token=image_token, image_start="", image_end="",
        stop_tokens=[t for t in ("<|im_end|>", "<|endoftext|>") if tokenizer.token_to_id(t) is not None],
        image_layout="anyres_unpad", anyres_max_tiles=int(aspect.group(1)) if aspect else 0)
    return model_config, tokenizer


def weight_files(path: Path) -> list[Path]:
    return safetensors_files(path)


def sanitize(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers VLM names (either on-disk spelling) -> native names; SigLIP's pooling head, which
    LLaVA-OneVision never uses, is dropped when the tower config kept it."""
    return {k: v for k, v in _hf_sanitize(weights, config).items() if not k.startswith("vision.head.")}

"""transformers-native `InternVLForConditionalGeneration` directories (what `save_pretrained` writes).

On disk 5.x writes the legacy spelling (`vision_tower.*`, `multi_modal_projector.*`,
`language_model.model.*`, `language_model.lm_head.*`); 4.52-4.57 wrote `model.vision_tower.*`,
`model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.*`. Both map to native names, whose
vision and projector parts are transformers' InternVL names already (shared reference 3.1-3.2).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fundusrt.config import IMAGENET_MEAN, IMAGENET_STD, ConnectorConfig, ModelConfig, TextConfig, TilingConfig, VisionConfig
from fundusrt.models.layouts.common import (
    CONFIG_FILE,
    bos_token,
    config_json,
    load_tokenizer,
    read_json,
    rename,
    safetensors_files,
    text_config,
)
from fundusrt.models.layouts.internvl_chat import FUNDUSEXPERT_SYSTEM

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

NAME = "hf_internvl"
# Shared by the transformers-native layouts: both spellings of the VLM prefixes -> native names.
VLM_RULES = [
    (r"^(model\.)?vision_tower\.(vision_model\.)?", "vision."),
    (r"^(model\.)?multi_modal_projector\.", "connector."),
    (r"^(model\.)?image_newline$", "image_newline"),
    (r"^model\.language_model\.", "language_model.model."),
    (r"^language_model\.model\.", "language_model.model."),
    (r"^(language_model\.)?lm_head\.", "language_model.lm_head."),
]


def detect(path: Path) -> bool:
    """True for config.json with model_type "internvl"."""
    return config_json(path).get("model_type") == "internvl"


def _size(value: int | list[int]) -> int:
    sizes = value if isinstance(value, list) else [value, value]
    if sizes[0] != sizes[1]:
        raise ValueError(f"non-square vision size {sizes} is not supported")
    return int(sizes[0])


def _preprocessor(path: Path) -> dict:
    file = path / "preprocessor_config.json"
    return read_json(file) if file.is_file() else {}


def read_config(path: Path) -> tuple[ModelConfig, Tokenizer]:
    """ModelConfig and tokenizer of an InternVLForConditionalGeneration directory."""
    config = read_json(path / CONFIG_FILE)
    vc, tc = config["vision_config"], config["text_config"]
    if config.get("vision_feature_select_strategy", "default") != "default":
        raise ValueError("only vision_feature_select_strategy 'default' (CLS dropped) is supported for InternVL")
    image_size = _size(vc.get("image_size", 448))
    vision = VisionConfig(
        type="internvit", hidden_size=vc["hidden_size"], num_layers=vc["num_hidden_layers"],
        num_heads=vc["num_attention_heads"], intermediate_size=vc["intermediate_size"], image_size=image_size,
        patch_size=_size(vc.get("patch_size", 14)), layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        hidden_act=vc.get("hidden_act", "gelu"), qkv_bias=vc.get("attention_bias", False),
        qk_norm=vc.get("use_qk_norm", False), norm_type=vc.get("norm_type", "layer_norm"))
    text_type = tc.get("model_type", "qwen2")
    pre = _preprocessor(path)
    tiling = TilingConfig(
        policy="internvl_dynamic" if pre.get("crop_to_patches", True) else "single", tile_size=image_size,
        min_tiles=int(pre.get("min_patches", 1)), max_tiles=int(pre.get("max_patches", 12)),
        use_thumbnail=True, mean=tuple(pre.get("image_mean", IMAGENET_MEAN)), std=tuple(pre.get("image_std", IMAGENET_STD)))
    tokenizer = load_tokenizer(path, "Save one with transformers: AutoTokenizer.from_pretrained(CHECKPOINT)"
                                     ".save_pretrained(CHECKPOINT).")
    image_token = tokenizer.id_to_token(int(config.get("image_token_id", 151667)))
    if image_token is None:
        raise ValueError(f"image_token_id {config.get('image_token_id')} is not in the tokenizer")
    model_config = ModelConfig(
        vision=vision, connector=ConnectorConfig(type="pixel_shuffle", feature_layer=int(config.get(
            "vision_feature_layer", -1)), downsample_ratio=float(config.get("downsample_ratio", 0.5))),
        text=TextConfig(type=text_type, config=text_config(tc, tie_word_embeddings=bool(
            config.get("tie_word_embeddings", False)))),
        tiling=tiling, name=path.resolve().name, family="internvl", chat_template="chatml",
        system_message=FUNDUSEXPERT_SYSTEM, image_token=image_token, image_start="<img>", image_end="</img>",
        stop_tokens=["<|im_end|>"], bos_token=bos_token(path, default=text_type == "llama"))
    return model_config, tokenizer


def weight_files(path: Path) -> list[Path]:
    return safetensors_files(path)


def sanitize(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """transformers VLM names (either on-disk spelling) -> native names."""
    weights = rename(weights, VLM_RULES)
    if config.text.config.get("tie_word_embeddings") and "language_model.lm_head.weight" not in weights:
        weights["language_model.lm_head.weight"] = weights["language_model.model.embed_tokens.weight"]
    return weights

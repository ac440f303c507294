"""Original LLaVA / LLaVA-NeXT / Dense Connector checkpoints (EyecareGPT style): `Llava*ForCausalLM`.

Tensors (shared reference section 2): the LLM under plain HF names (`model.*`, `lm_head.weight`; Phi-3
keeps its packed `qkv_proj` / `gate_up_proj`, which transformers' Phi3 reads as is), the projector
`model.mm_projector.{0,2}` (mlp2x_gelu), `model.image_newline` (spatial_unpad) and, when the checkpoint
kept it, the SigLIP tower `model.vision_tower.vision_tower.vision_model.*`.

A checkpoint without tower weights is completed from `mm_vision_tower` when that names a local
directory (what LLaVA's `load_model` reads); hub ids cannot be downloaded here, so that case is an
error naming the key. The tower's shape comes from that directory's config.json, else from the known
SigLIP-so400m-patch14-384 values.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, ConnectorConfig, ModelConfig, TextConfig, TilingConfig, VisionConfig
from fundusrt.models.layouts.common import (
    CONFIG_FILE,
    bos_token,
    config_json,
    ensure_special_token,
    load_tokenizer,
    read_json,
    rename,
    safetensors_files,
    tensor_headers,
    text_config,
)

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

NAME = "llava"
IMAGE_TOKEN = "<image>"
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
# google/siglip-so400m-patch14-384 (LLaVA-NeXT's SigLipVisionConfig defaults).
SIGLIP_SO400M = {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16, "intermediate_size": 4304,
                 "image_size": 384, "patch_size": 14, "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
# model_type / architecture word -> (text type, chat template, system message, stop tokens)
LLMS = {
    "phi": ("phi3", "phi3", "You are a helpful AI assistant.", ["<|end|>", "<|endoftext|>"]),
    "qwen": ("qwen2", "chatml", "You are a helpful assistant.", ["<|im_end|>", "<|endoftext|>"]),
}
RULES = [
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision."),
    (r"^vision_model\.", "vision."),  # a local mm_vision_tower's SiglipVisionModel / SiglipModel file
    (r"^model\.mm_projector\.0\.", "connector.linear_1."),
    (r"^model\.mm_projector\.2\.", "connector.linear_2."),
    (r"^model\.image_newline$", "image_newline"),
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
]


def detect(path: Path) -> bool:
    """True for a config.json with `mm_vision_tower` (LLaVA's multimodal config keys)."""
    return "mm_vision_tower" in config_json(path)


def _llm(config: dict[str, Any]) -> tuple[str, str, str, list[str]]:
    kind = " ".join([str(config.get("model_type", "")), *config.get("architectures", [])]).lower()
    for word, llm in LLMS.items():
        if word in kind:
            return llm
    raise ValueError(f"LLaVA LLM {kind!r} is not supported; fundusrt runs the Phi-3 and Qwen2 variants "
                     "(model_type llava_phi / llava_phi3 / llava_qwen)")


def tower_dir(path: Path, config: dict[str, Any]) -> Path | None:
    """The local directory `mm_vision_tower` names (absolute, or relative to the checkpoint), if any."""
    name = Path(str(config["mm_vision_tower"]))
    for candidate in (name, path / name):
        if candidate.is_dir():
            return candidate
    return None


def _tower_config(path: Path, config: dict[str, Any]) -> dict[str, Any]:
    tower = str(config["mm_vision_tower"])
    if "siglip" not in tower.lower():
        raise ValueError(f"mm_vision_tower {tower!r} is not a SigLIP tower; fundusrt runs SigLIP-based LLaVA models")
    local = tower_dir(path, config)
    if local is not None and (local / CONFIG_FILE).is_file():
        tower_config = read_json(local / CONFIG_FILE)
        return tower_config.get("vision_config", tower_config)
    if "so400m-patch14-384" in tower:
        return dict(SIGLIP_SO400M)
    raise ValueError(f"cannot tell the shape of mm_vision_tower {tower!r}: point it at a local directory holding "
                     "the tower's config.json")


def _layer_groups(config: dict[str, Any], num_layers: int) -> list[list[int]]:
    explicit = config.get("mm_dense_connector_layer_groups")
    if explicit:
        return [list(group) for group in explicit]
    kind = config.get("mm_dense_connector_type")
    if kind == "dci":
        # Dense Connector: CLIP-L (24 layers) means hidden_states[0:12] and [12:24]; SigLIP (27) [0:13], [13:26].
        half = num_layers // 2
        return [list(range(half)), list(range(half, 2 * half))]
    if kind == "sci":
        return [[7], [15]]
    if kind == "sti":
        raise ValueError("mm_dense_connector_type 'sti' (token concatenation) is not supported; use dci or sci")
    return []


def _tiling(config: dict[str, Any], tile: int) -> tuple[TilingConfig, str, int]:
    """Tiling, image layout and anyres_max N from image_aspect_ratio / pinpoints / mm_patch_merge_type."""
    aspect = str(config.get("image_aspect_ratio") or "square")
    merge = str(config.get("mm_patch_merge_type") or "flat")
    if aspect.startswith("anyres"):
        pinpoints = config.get("image_grid_pinpoints") or []
        if isinstance(pinpoints, str):
            pinpoints = grid_from_pinpoint_string(pinpoints, tile)
        bad = [p for p in pinpoints if p[0] % tile or p[1] % tile]
        if bad or not pinpoints:
            raise ValueError(f"image_grid_pinpoints must be multiples of the tower's {tile} px tiles, got {bad or 'none'}")
        grid_max = max(w * h for w, h in pinpoints) // tile**2
        tiling = TilingConfig(policy="anyres", tile_size=tile, max_tiles=grid_max, use_thumbnail=True,
                              grid_pinpoints=pinpoints, mean=SIGLIP_MEAN, std=SIGLIP_STD)
        if "unpad" in merge:
            layout = "anyres_unpad"
        elif merge == "flat":
            layout = "flat"
        else:
            raise ValueError(f"mm_patch_merge_type {merge!r} is not supported (flat or spatial_unpad)")
        match = re.fullmatch(r"anyres_max_(\d+)", aspect)
        return tiling, layout, int(match.group(1)) if match else 0
    if aspect == "pad":
        # expand2square pads with the mean colour before one resize; fundusrt's nearest plan fits the image
        # into one tile and pads with black, which differs along the padded border.
        warnings.warn("image_aspect_ratio 'pad' is approximated by an aspect-preserving fit into one tile padded "
                      "with black (LLaVA pads with the mean colour)", stacklevel=3)
        return TilingConfig(policy="anyres", tile_size=tile, max_tiles=1, use_thumbnail=False,
                            grid_pinpoints=[(tile, tile)], mean=SIGLIP_MEAN, std=SIGLIP_STD), "flat", 0
    return TilingConfig(policy="single", tile_size=tile, max_tiles=1, use_thumbnail=False,
                        mean=SIGLIP_MEAN, std=SIGLIP_STD), "flat", 0


def read_config(path: Path) -> tuple[ModelConfig, Tokenizer]:
    """ModelConfig and tokenizer of a LLaVA checkpoint (the tokenizer gains an `<image>` marker token)."""
    config = read_json(path / CONFIG_FILE)
    text_type, template, system, stops = _llm(config)
    tower = _tower_config(path, config)
    stored = {int(m.group(1)) for name in tensor_headers(safetensors_files(path))
              if (m := re.match(re.escape(TOWER_PREFIX) + r"encoder\.layers\.(\d+)\.", name))}
    # LLaVA-NeXT drops SigLIP's last layer before saving; count what the checkpoint holds when it holds any.
    num_layers = max(stored) + 1 if stored else int(tower["num_hidden_layers"])
    vision = VisionConfig(
        type="siglip", hidden_size=tower["hidden_size"], num_layers=num_layers,
        num_heads=tower["num_attention_heads"], intermediate_size=tower["intermediate_size"],
        image_size=tower["image_size"], patch_size=tower["patch_size"],
        layer_norm_eps=tower.get("layer_norm_eps", 1e-6), hidden_act=tower.get("hidden_act", "gelu_pytorch_tanh"))
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError(f"mm_projector_type {config.get('mm_projector_type')!r} is not supported (mlp2x_gelu)")
    groups = _layer_groups(config, num_layers)
    connector = ConnectorConfig(type="dense" if groups else "mlp", layer_groups=groups,
                                feature_layer=int(config.get("mm_vision_select_layer", -2)))
    width = connector.feature_width(vision.hidden_size)
    if config.get("mm_hidden_size", width) != width:
        raise ValueError(f"mm_hidden_size {config['mm_hidden_size']} does not match the connector input {width} "
                         f"({1 + len(groups)} x {vision.hidden_size})")
    tiling, layout, max_tiles = _tiling(config, vision.image_size)
    text = TextConfig(type=text_type, config=text_config(config))
    tokenizer = load_tokenizer(path, "Save one with transformers: AutoTokenizer.from_pretrained(CHECKPOINT)"
                                     ".save_pretrained(CHECKPOINT).")
    ensure_special_token(tokenizer, IMAGE_TOKEN, text.vocab_size)
    model_config = ModelConfig(
        vision=vision, connector=connector, text=text, tiling=tiling, name=path.resolve().name, family="llava",
        chat_template=template, system_message=system, image_token=IMAGE_TOKEN, image_start="", image_end="",
        stop_tokens=[t for t in stops if tokenizer.token_to_id(t) is not None],
        bos_token=bos_token(path, default=False), image_layout=layout, anyres_max_tiles=max_tiles)
    return model_config, tokenizer


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's safetensors, plus the local tower's when the checkpoint lacks vision weights."""
    files = safetensors_files(path)
    if any(name.startswith(TOWER_PREFIX) for name in tensor_headers(files)):
        return files
    config = read_json(path / CONFIG_FILE)
    local = tower_dir(path, config)
    if local is None:
        raise FileNotFoundError(
            f"the checkpoint holds no vision tower weights ({TOWER_PREFIX}*), and LLaVA would download them from "
            f"mm_vision_tower {config['mm_vision_tower']!r}; downloads are impossible here, so set mm_vision_tower in "
            f"{path / CONFIG_FILE} to a local directory holding that tower's safetensors and config.json")
    try:
        return files + safetensors_files(local)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"the checkpoint holds no vision tower weights ({TOWER_PREFIX}*) and mm_vision_tower "
                                f"{config['mm_vision_tower']!r} has none either: {exc}") from exc


def sanitize(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """LLaVA names -> native names. SigLIP's attention-pooling head and, from a separate tower file, the
    text model are unused by LLaVA and dropped, as are tower layers beyond those the config keeps."""
    out = {}
    kept = config.vision.num_layers
    for name, tensor in rename(weights, RULES).items():
        layer = re.match(r"vision\.encoder\.layers\.(\d+)\.", name)
        if name.startswith(("vision.head.", "text_model.", "logit_scale", "logit_bias")) or (
                layer and int(layer.group(1)) >= kept):
            continue
        out[name] = tensor
    return out


def grid_from_pinpoint_string(pinpoints: str, tile: int) -> list[tuple[int, int]]:
    """LLaVA-NeXT "(AxB),...,(CxD)" -> [(i*tile, j*tile) for i in A..C for j in B..D] as (w, h)."""
    found = [tuple(map(int, m)) for m in re.findall(r"\((\d+)x(\d+)\)", pinpoints)]
    if not found:
        raise ValueError(f"image_grid_pinpoints {pinpoints!r} has no (AxB) ranges")
    (c0, r0), (c1, r1) = found[0], found[-1]
    return [(i * tile, j * tile) for i in range(c0, c1 + 1) for j in range(r0, r1 + 1)]

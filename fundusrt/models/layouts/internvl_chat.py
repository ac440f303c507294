"""InternVL 2.5 "chat" checkpoints (FundusExpert 8B, FundusExpert-mini): `InternVLChatModel` remote code.

Tensors (shared reference section 1): `vision_model.*` InternViT with packed qkv, optional qk-norm and
layer scale; `mlp1.{0,1,3}` the pixel-shuffle projector; `language_model.*` a Qwen2ForCausalLM (mini)
or an InternLM2ForCausalLM (8B), which becomes a LlamaForCausalLM here by splitting its packed `wqkv`
per KV group (reference 1.6). Prompt: the `internvl2_5` template (ChatML), `<img>` +
`<IMG_CONTEXT>` x 256 per tile + `</img>`, stop at `<|im_end|>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fundusrt.config import IMAGENET_MEAN, IMAGENET_STD, ConnectorConfig, ModelConfig, TextConfig, TilingConfig, VisionConfig
from fundusrt.models.layouts.common import (
    CONFIG_FILE,
    bos_token,
    config_json,
    load_tokenizer,
    read_json,
    rename,
    safetensors_files,
    split_rows,
    text_config,
)

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

NAME = "internvl_chat"
# FundusExpert's copy of conversation.py; a top-level "system_message" in config.json overrides it.
FUNDUSEXPERT_SYSTEM = "你是FundusExpert，是一个有用无害的人工智能助手。"
TEXT_TYPES = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "llama", "LlamaForCausalLM": "llama",
              "Phi3ForCausalLM": "phi3"}

VISION_RULES = [
    (r"^vision_model\.embeddings\.class_embedding$", "vision.embeddings.cls_token"),
    (r"^vision_model\.embeddings\.position_embedding$", "vision.embeddings.position_embeddings"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "vision.embeddings.patch_embeddings.projection."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm1\.", r"vision.encoder.layer.\1.layernorm_before."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.norm2\.", r"vision.encoder.layer.\1.layernorm_after."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.ls(\d)$", r"vision.encoder.layer.\1.lambda_\2"),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.", r"vision.encoder.layer.\1.attention.projection_layer."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.attn\.", r"vision.encoder.layer.\1.attention."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision.encoder.layer.\1.mlp."),
    (r"^mlp1\.0\.", "connector.layer_norm."),
    (r"^mlp1\.1\.", "connector.linear_1."),
    (r"^mlp1\.3\.", "connector.linear_2."),
]
INTERNLM2_RULES = [
    (r"^language_model\.model\.tok_embeddings\.", "language_model.model.embed_tokens."),
    (r"^language_model\.output\.", "language_model.lm_head."),
    (r"\.attention\.wo\.", ".self_attn.o_proj."),
    (r"\.feed_forward\.w1\.", ".mlp.gate_proj."),
    (r"\.feed_forward\.w3\.", ".mlp.up_proj."),
    (r"\.feed_forward\.w2\.", ".mlp.down_proj."),
    (r"\.attention_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
]


def detect(path: Path) -> bool:
    """True for config.json with model_type "internvl_chat" (or architecture InternVLChatModel)."""
    config = config_json(path)
    return config.get("model_type") == "internvl_chat" or "InternVLChatModel" in (config.get("architectures") or [])


def _text(llm: dict[str, Any]) -> TextConfig:
    arch = (llm.get("architectures") or ["?"])[0]
    if arch not in TEXT_TYPES:
        raise ValueError(f"llm_config.architectures {arch!r} is not supported; known: {sorted(TEXT_TYPES)}")
    if arch == "InternLM2ForCausalLM":
        return TextConfig(type="llama", config=text_config(llm, attention_bias=bool(llm.get("bias", False)),
                                                           hidden_act=llm.get("hidden_act", "silu")))
    return TextConfig(type=TEXT_TYPES[arch], config=text_config(llm))


def vision_config(vc: dict[str, Any], image_size: int) -> VisionConfig:
    """VisionConfig of an InternVisionConfig dict (defaults are those of configuration_intern_vit.py)."""
    return VisionConfig(
        type="internvit", hidden_size=vc.get("hidden_size", 3200), num_layers=vc.get("num_hidden_layers", 48),
        num_heads=vc.get("num_attention_heads", 25), intermediate_size=vc.get("intermediate_size", 12800),
        image_size=image_size, patch_size=vc.get("patch_size", 14), layer_norm_eps=vc.get("layer_norm_eps", 1e-6),
        hidden_act=vc.get("hidden_act", "gelu"), qkv_bias=vc.get("qkv_bias", False),
        qk_norm=vc.get("qk_normalization", True), norm_type=vc.get("norm_type", "rms_norm"),
    )


def read_config(path: Path) -> tuple[ModelConfig, Tokenizer]:
    """ModelConfig and tokenizer of an InternVL chat checkpoint."""
    config = read_json(path / CONFIG_FILE)
    vc, llm = config["vision_config"], config["llm_config"]
    image_size = int(config.get("force_image_size") or vc.get("image_size", 224))
    if image_size != vc.get("image_size", image_size):
        raise ValueError(f"force_image_size {image_size} differs from vision_config.image_size {vc['image_size']}; "
                         "position-embedding interpolation is not supported")
    if config.get("ps_version", "v1") != "v2":
        raise ValueError(f"ps_version {config.get('ps_version', 'v1')!r} is not supported (only InternVL 2.5's 'v2')")
    text = _text(llm)
    dynamic = config.get("dynamic_image_size", True)
    tiling = TilingConfig(
        policy="internvl_dynamic" if dynamic else "single", tile_size=image_size,
        min_tiles=int(config.get("min_dynamic_patch", 1)) if dynamic else 1,
        max_tiles=int(config.get("max_dynamic_patch", 12)) if dynamic else 1,
        use_thumbnail=bool(config.get("use_thumbnail", True)) and dynamic, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    internlm2 = llm["architectures"][0] == "InternLM2ForCausalLM"
    model_config = ModelConfig(
        vision=vision_config(vc, image_size),
        connector=ConnectorConfig(type="pixel_shuffle", feature_layer=int(config.get("select_layer", -1)),
                                  downsample_ratio=float(config.get("downsample_ratio", 0.5))),
        text=text, tiling=tiling, name=path.resolve().name, family="internvl_chat", chat_template="chatml",
        system_message=config.get("system_message") or FUNDUSEXPERT_SYSTEM, image_token="<IMG_CONTEXT>",
        image_start="<img>", image_end="</img>", stop_tokens=["<|im_end|>"],
        # The InternLM2 tokenizer prepends <s>; Qwen2's adds nothing.
        bos_token=bos_token(path, default=internlm2),
    )
    tokenizer = load_tokenizer(path, "Save one with transformers: AutoTokenizer.from_pretrained(CHECKPOINT, "
                                     "trust_remote_code=True).save_pretrained(CHECKPOINT) (needs sentencepiece).")
    return model_config, tokenizer


def weight_files(path: Path) -> list[Path]:
    return safetensors_files(path)


def split_vision_qkv(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`attn.qkv` (3D, D) -> q/k/v_proj: rows [0, D), [D, 2D), [2D, 3D); biases alike."""
    out = {}
    for name, tensor in weights.items():
        if ".attn.qkv." in name:
            third = tensor.shape[0] // 3
            for part, piece in zip("qkv", split_rows(tensor, [third] * 3), strict=True):
                out[name.replace(".attn.qkv.", f".attn.{part}_proj.")] = piece
        else:
            out[name] = tensor
    return out


def split_wqkv(wqkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, ...]:
    """InternLM2 `wqkv` -> (q, k, v) projections (rows per KV group: g query heads, then k, then v)."""
    groups = num_heads // num_kv_heads
    head_dim = wqkv.shape[0] // (num_kv_heads * (groups + 2))
    tail = wqkv.shape[1:]
    packed = wqkv.reshape(num_kv_heads, groups + 2, head_dim, *tail)
    q = packed[:, :groups].reshape(num_heads * head_dim, *tail)
    k = packed[:, groups].reshape(num_kv_heads * head_dim, *tail)
    v = packed[:, groups + 1].reshape(num_kv_heads * head_dim, *tail)
    return q, k, v


def sanitize(weights: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """InternVL chat names -> native names (vision and InternLM2 packed projections split)."""
    weights = rename(split_vision_qkv(weights), VISION_RULES)
    if not any(".attention.wqkv." in name for name in weights):
        return weights
    out = {}
    for name, tensor in rename(weights, INTERNLM2_RULES).items():
        if ".attention.wqkv." in name:
            parts = split_wqkv(tensor, config.text.num_heads, config.text.num_kv_heads)
            for proj, piece in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                out[name.replace(".attention.wqkv.", f".self_attn.{proj}.")] = piece
        else:
            out[name] = tensor
    return out


def tensor_shapes(vc: dict[str, Any], llm: dict[str, Any], internlm2: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor a checkpoint with this `vision_config` / `llm_config` holds (InternLM2
    or Qwen2 decoder): what synthetic checkpoints of real shapes are written from."""
    d, f, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    g = vc["image_size"] // p
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, d),
        "vision_model.embeddings.patch_embedding.weight": (d, 3, p, p),
        "vision_model.embeddings.patch_embedding.bias": (d,),
        "vision_model.embeddings.position_embedding": (1, g * g + 1, d),
    }
    norm_params = ("weight", "bias") if vc["norm_type"] == "layer_norm" else ("weight",)
    for i in range(vc["num_hidden_layers"]):
        pre = f"vision_model.encoder.layers.{i}."
        for norm in ("norm1", "norm2"):
            shapes |= {f"{pre}{norm}.{k}": (d,) for k in norm_params}
        shapes[pre + "attn.qkv.weight"] = (3 * d, d)
        if vc["qkv_bias"]:
            shapes[pre + "attn.qkv.bias"] = (3 * d,)
        if vc["qk_normalization"]:
            shapes |= {pre + "attn.q_norm.weight": (d,), pre + "attn.k_norm.weight": (d,)}
        shapes |= {pre + "attn.proj.weight": (d, d), pre + "attn.proj.bias": (d,), pre + "ls1": (d,),
                   pre + "ls2": (d,), pre + "mlp.fc1.weight": (f, d), pre + "mlp.fc1.bias": (f,),
                   pre + "mlp.fc2.weight": (d, f), pre + "mlp.fc2.bias": (d,)}
    h, inter, v = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    hd = h // heads
    shapes |= {"mlp1.0.weight": (4 * d,), "mlp1.0.bias": (4 * d,), "mlp1.1.weight": (h, 4 * d), "mlp1.1.bias": (h,),
               "mlp1.3.weight": (h, h), "mlp1.3.bias": (h,)}
    lm = "language_model.model."
    if internlm2:
        shapes |= {lm + "tok_embeddings.weight": (v, h), lm + "norm.weight": (h,), "language_model.output.weight": (v, h)}
        for i in range(llm["num_hidden_layers"]):
            pre = f"{lm}layers.{i}."
            shapes |= {pre + "attention.wqkv.weight": ((heads + 2 * kv) * hd, h), pre + "attention.wo.weight": (h, h),
                       pre + "feed_forward.w1.weight": (inter, h), pre + "feed_forward.w3.weight": (inter, h),
                       pre + "feed_forward.w2.weight": (h, inter), pre + "attention_norm.weight": (h,),
                       pre + "ffn_norm.weight": (h,)}
        return shapes
    shapes |= {lm + "embed_tokens.weight": (v, h), lm + "norm.weight": (h,), "language_model.lm_head.weight": (v, h)}
    for i in range(llm["num_hidden_layers"]):
        pre = f"{lm}layers.{i}."
        shapes |= {pre + "self_attn.q_proj.weight": (h, h), pre + "self_attn.q_proj.bias": (h,),
                   pre + "self_attn.k_proj.weight": (kv * hd, h), pre + "self_attn.k_proj.bias": (kv * hd,),
                   pre + "self_attn.v_proj.weight": (kv * hd, h), pre + "self_attn.v_proj.bias": (kv * hd,),
                   pre + "self_attn.o_proj.weight": (h, h), pre + "mlp.gate_proj.weight": (inter, h),
                   pre + "mlp.up_proj.weight": (inter, h), pre + "mlp.down_proj.weight": (h, inter),
                   pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,)}
    return shapes

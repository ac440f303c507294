"""Tiny random checkpoints written in the real on-disk layouts (tensor names, shapes, config keys, shards).

Names and shapes follow the shared reference (checkpoint-layouts.md) tables directly, not fundusrt's
mapping code, so a wrong mapping cannot hide behind a matching writer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer
from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

from fundusrt.models.layouts.internvl_chat import tensor_shapes
from fundusrt.models.tokenizer import build_tokenizer

VOCAB = 600  # tokenizer (512 + a few added) plus spare rows, like real padded embedding tables


def tokenizer(*extra: str) -> Tokenizer:
    tok = build_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra])
    return tok


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Weights with unit-scale activations and distinct norms/biases, so mix-ups change the output."""
    if len(shape) >= 2:
        fan_in = int(torch.tensor(shape[1:]).prod())
        std = 1.0 if "emb" in name and "patch" not in name else 1.0 / fan_in**0.5
        if name.endswith(("lm_head.weight", "output.weight")):
            std = 2.0 / fan_in**0.5
        return torch.randn(shape, generator=gen) * std
    if name.endswith("bias"):
        return torch.randn(shape, generator=gen) * 0.1
    if name.endswith(("ls1", "ls2")):
        return 0.5 + torch.rand(shape, generator=gen)
    return 1.0 + 0.1 * torch.randn(shape, generator=gen)  # norm weights, image_newline


def write_sharded(root: Path, shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype,
                  shards: int = 2) -> dict[str, torch.Tensor]:
    """Random tensors for `shapes`, saved as `shards` safetensors files plus model.safetensors.index.json."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: random_tensor(name, shape, gen).to(dtype) for name, shape in shapes.items()}
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(root / file), metadata={"format": "pt"})
        weight_map |= {n: file for n in part}
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors


# -- InternVL 2.5 chat ------------------------------------------------------------------------------

IVL_VISION = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
              "patch_size": 8, "image_size": 64, "num_channels": 3, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
              "model_type": "intern_vit_6b", "drop_path_rate": 0.1, "use_flash_attn": False}
IVL_LLM = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
           "rope_theta": 1000000.0, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "tie_word_embeddings": False}


def write_internvl_chat(root: Path, *, internlm2: bool, qk_norm: bool = False, seed: int = 0,
                        max_dynamic_patch: int = 6, llm_sizes: dict | None = None) -> Path:
    """A tiny FundusExpert-style InternVLChatModel directory (bf16 weights for the InternLM2 variant);
    `llm_sizes` overrides llm_config entries (a bigger decoder)."""
    root.mkdir(parents=True, exist_ok=True)
    vc = {**IVL_VISION, "qkv_bias": not qk_norm, "qk_normalization": qk_norm,
          "norm_type": "rms_norm" if qk_norm else "layer_norm"}
    if internlm2:
        llm = {**IVL_LLM, "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "bias": False,
               "attn_implementation": "eager", "bos_token_id": 1, "eos_token_id": 2}
        tok = tokenizer("<s>")
    else:
        llm = {**IVL_LLM, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": False}
        tok = tokenizer()
    llm |= llm_sizes or {}
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "template": "internvl2_5", "downsample_ratio": 0.5, "force_image_size": 64, "ps_version": "v2",
        "select_layer": -1, "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
        "max_dynamic_patch": max_dynamic_patch, "pad2square": False, "use_backbone_lora": 0, "use_llm_lora": 0,
        "tie_word_embeddings": False, "hidden_size": llm["hidden_size"], "torch_dtype": "bfloat16",
        "vision_config": vc, "llm_config": llm,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer.json").write_text(tok.to_str())
    (root / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": internlm2, "bos_token": "<s>"}))
    write_sharded(root, tensor_shapes(vc, llm, internlm2), seed,
                  torch.bfloat16 if internlm2 else torch.float32)
    return root


# -- LLaVA + dense connector (EyecareGPT style: SigLIP + Phi-3, anyres, spatial_unpad) -----------------

SIGLIP_TINY = {"model_type": "siglip_vision_model", "hidden_size": 32, "num_hidden_layers": 4,
               "num_attention_heads": 4, "intermediate_size": 64, "image_size": 32, "patch_size": 8,
               "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh"}
PHI3_TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
             "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
PHI3_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


def siglip_shapes(prefix: str, vc: dict, head: bool) -> dict[str, tuple[int, ...]]:
    d, f, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    g = vc["image_size"] // p
    shapes: dict[str, tuple[int, ...]] = {
        prefix + "embeddings.patch_embedding.weight": (d, 3, p, p), prefix + "embeddings.patch_embedding.bias": (d,),
        prefix + "embeddings.position_embedding.weight": (g * g, d),
        prefix + "post_layernorm.weight": (d,), prefix + "post_layernorm.bias": (d,),
    }
    for i in range(vc["num_hidden_layers"]):
        pre = f"{prefix}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{pre}self_attn.{proj}.weight": (d, d), f"{pre}self_attn.{proj}.bias": (d,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{pre}{norm}.weight": (d,), f"{pre}{norm}.bias": (d,)}
        shapes |= {pre + "mlp.fc1.weight": (f, d), pre + "mlp.fc1.bias": (f,), pre + "mlp.fc2.weight": (d, f),
                   pre + "mlp.fc2.bias": (d,)}
    if head:  # SigLIP's attention-pooling head, which the Dense Connector keeps and never uses
        shapes |= {prefix + "head.probe": (1, 1, d), prefix + "head.layernorm.weight": (d,)}
    return shapes


def llava_phi3_shapes(vc: dict, llm: dict, mm_hidden: int, with_tower: bool) -> dict[str, tuple[int, ...]]:
    h, inter, v = llm["hidden_size"], llm["intermediate_size"], llm["vocab_size"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    hd = h // heads
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h),
              "model.mm_projector.0.weight": (h, mm_hidden), "model.mm_projector.0.bias": (h,),
              "model.mm_projector.2.weight": (h, h), "model.mm_projector.2.bias": (h,), "model.image_newline": (h,)}
    for i in range(llm["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes |= {pre + "self_attn.qkv_proj.weight": ((heads + 2 * kv) * hd, h), pre + "self_attn.o_proj.weight": (h, h),
                   pre + "mlp.gate_up_proj.weight": (2 * inter, h), pre + "mlp.down_proj.weight": (h, inter),
                   pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,)}
    if with_tower:
        shapes |= siglip_shapes("model.vision_tower.vision_tower.vision_model.", vc, head=True)
    return shapes


def write_llava_phi3_dense(root: Path, *, seed: int = 0, with_tower: bool = True) -> Path:
    """A tiny EyecareGPT-style checkpoint: LlavaPhiForCausalLM, SigLIP tower, dci dense connector, anyres."""
    root.mkdir(parents=True, exist_ok=True)
    tower = root / "siglip-tiny-patch8-32"
    tower.mkdir(exist_ok=True)
    (tower / "config.json").write_text(json.dumps(SIGLIP_TINY))
    mm_hidden = 3 * SIGLIP_TINY["hidden_size"]
    config = {
        **PHI3_TINY, "architectures": ["LlavaPhiForCausalLM"], "model_type": "llava_phi",
        "mm_vision_tower": tower.name, "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": mm_hidden,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_dense_connector_type": "dci",
        "image_aspect_ratio": "anyres", "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32]],
        "mm_patch_merge_type": "spatial_unpad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_mm_proj": True,
        "torch_dtype": "float16",
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "tokenizer.json").write_text(tokenizer(*PHI3_TOKENS).to_str())
    (root / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    write_sharded(root, llava_phi3_shapes(SIGLIP_TINY, PHI3_TINY, mm_hidden, with_tower), seed, torch.float16)
    return root


# -- transformers-native directories (what save_pretrained writes) --------------------------------------

QWEN2_TINY = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
              "max_position_embeddings": 2048}
SHARD = "120KB"  # several shards plus model.safetensors.index.json for these tiny models


def fundus_like(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([x / width * 220, y / height * 160, (x * y) % 89 * 2.5], axis=-1)
    return np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)


@torch.no_grad()
def _randomise(model: torch.nn.Module, seed: int) -> None:
    """The layout fixtures' weight scales (unit-scale activations, wide logits), so greedy decoding of a
    random model is varied."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.copy_(random_tensor(name, tuple(p.shape), gen))


def write_hf_internvl(root: Path, seed: int = 0, tie_word_embeddings: bool = False,
                      ) -> tuple[InternVLForConditionalGeneration, Tokenizer]:
    """A tiny InternVLForConditionalGeneration saved by transformers in bf16 and sharded; returns the model
    (float32, holding exactly the saved bf16 values) and its tokenizer."""
    tok = tokenizer()
    config = InternVLConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                       "image_size": [64, 64], "patch_size": [8, 8], "attention_bias": True},
        text_config=QWEN2_TINY, image_token_id=tok.token_to_id("<IMG_CONTEXT>"), image_seq_length=16,
        downsample_ratio=0.5, tie_word_embeddings=tie_word_embeddings)
    model = InternVLForConditionalGeneration(config).eval()
    _randomise(model, seed)
    model.to(torch.bfloat16).save_pretrained(str(root), max_shard_size=SHARD)
    (root / "tokenizer.json").write_text(tok.to_str())
    return model.float(), tok


def write_hf_llava_onevision(root: Path, seed: int = 0) -> tuple[LlavaOnevisionForConditionalGeneration, Tokenizer]:
    """A tiny LlavaOnevisionForConditionalGeneration (SigLIP, three concatenated feature layers, anyres_max_1)
    saved by transformers, sharded; returns the model and its tokenizer."""
    tok = tokenizer("<image>")
    config = LlavaOnevisionConfig(
        vision_config=dict(SIGLIP_TINY), text_config=QWEN2_TINY, image_token_index=tok.token_to_id("<image>"),
        video_token_index=VOCAB - 1, vision_feature_layer=[-1, 1, 2], vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_1", image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [64, 96], [96, 96]],
        tie_word_embeddings=False)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    _randomise(model, seed)
    model.save_pretrained(str(root), max_shard_size=SHARD)
    (root / "tokenizer.json").write_text(tok.to_str())
    return model, tok



def assert_same_tokens(ours: list[int], theirs: list[int], stops: set[int], min_compared: int = 16) -> None:
    """Ours may stop at a stop token (not returned); up to there it must equal the reference exactly."""
    assert ours == theirs[:len(ours)], (
        f"first divergence at step {next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))}: "
        f"ours {ours}, reference {theirs}")
    assert len(ours) == len(theirs) or theirs[len(ours)] in stops, f"stopped early without a stop token: {ours}"
    assert len(ours) >= min_compared, f"only {len(ours)} tokens compared: {ours}"
    assert len(set(theirs)) > 4, f"degenerate reference output {theirs}"


def hf_greedy(model: torch.nn.Module, ids: list[int], new_tokens: int, **image_kwargs: object) -> list[int]:
    """Exactly `new_tokens` greedy tokens from transformers' own generate() (no early stop), prompt excluded."""
    tensor = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, eos_token_id=None,
                             pad_token_id=0, **image_kwargs)
    return out[0, len(ids):].tolist()

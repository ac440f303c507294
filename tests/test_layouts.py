"""Real checkpoint layouts: tiny random checkpoints in each on-disk layout are loaded, exported, run through
onnxruntime (fundusrt.load_package + ask) and matched token for token against an independent reference:
transformers' own VLM classes with the weights converted by the published rename rules restated here
(InternVL, LLaVA-OneVision), or a direct PyTorch computation of the formula (dense connector)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from transformers import InternVLConfig, InternVLForConditionalGeneration  # noqa: E402

from _layout_fixtures import (  # noqa: E402
    PHI3_TINY,
    SIGLIP_TINY,
    assert_same_tokens,
    fundus_like,
    hf_greedy,
    write_internvl_chat,
    write_llava_phi3_dense,
)
from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, GenerationConfig, TilingConfig  # noqa: E402
from fundusrt.export.package import export_package  # noqa: E402
from fundusrt.kernels import patchify  # noqa: E402
from fundusrt.models import CheckpointError, detect_layout, load  # noqa: E402
from fundusrt.models.layouts.internvl_chat import FUNDUSEXPERT_SYSTEM, split_wqkv  # noqa: E402
from fundusrt.runtime.pipeline import load_package  # noqa: E402

NEW_TOKENS = 24
QUESTION = "Is there diabetic retinopathy?"


# -- InternVL 2.5 chat (FundusExpert) -----------------------------------------------------------------

# transformers' convert_internvl_weights_to_hf.py rename rules, applied in order to every key (ref. 3.3).
HF_VISION_RULES = [("vision_model", "model.vision_tower"), (r"layers", "layer"), ("class_embedding", "cls_token"),
                   (r"position_embedding", "position_embeddings"),
                   (r"patch_embedding", "patch_embeddings.projection"), (r"ls(\d+)", r"lambda_\1"),
                   (r"attn\.proj", "attention.projection_layer"), (r"attn", "attention"),
                   (r"norm1", "layernorm_before"), (r"norm2", "layernorm_after")]
HF_INTERNLM2_RULES = [("tok_embeddings", "embed_tokens"), (r"attention\.wo", "self_attn.o_proj"),
                      (r"feed_forward\.w1", "mlp.gate_proj"), (r"feed_forward\.w2", "mlp.down_proj"),
                      (r"feed_forward\.w3", "mlp.up_proj"), ("attention_norm", "input_layernorm"),
                      ("ffn_norm", "post_attention_layernorm"), (r"language_model\.output", "language_model.lm_head")]
HF_PROJECTOR = {"mlp1.0": "model.multi_modal_projector.layer_norm", "mlp1.1": "model.multi_modal_projector.linear_1",
                "mlp1.3": "model.multi_modal_projector.linear_2"}


def _wqkv_by_forward(wqkv: torch.Tensor, heads: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """q/k/v weights as InternLM2Attention.forward reads them: project an identity batch, then
    rearrange 'b q (h gs d) -> b q h gs d' with gs = 2 + heads // kv_heads and slice."""
    hidden = wqkv.shape[1]
    groups = heads // kv_heads
    head_dim = wqkv.shape[0] // (kv_heads * (groups + 2))
    qkv = (torch.eye(hidden) @ wqkv.T).reshape(hidden, kv_heads, groups + 2, head_dim)
    q = qkv[:, :, :groups].reshape(hidden, heads * head_dim)
    return q.T, qkv[:, :, -2].reshape(hidden, -1).T, qkv[:, :, -1].reshape(hidden, -1).T


def chat_to_hf(weights: dict[str, torch.Tensor], llm: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in weights.items():
        tensor = tensor.float()
        if name.startswith("vision_model"):
            for pattern, repl in HF_VISION_RULES:
                name = re.sub(pattern, repl, name)
            if ".attention.qkv." in name:
                for part, piece in zip("qkv", tensor.chunk(3, dim=0), strict=True):
                    out[name.replace("attention.qkv", f"attention.{part}_proj")] = piece
                continue
        elif name.startswith("mlp1"):
            name = HF_PROJECTOR[name[:6]] + name[6:]
        else:
            for pattern, repl in HF_INTERNLM2_RULES:
                name = re.sub(pattern, repl, name)
            name = name.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head",
                                                                                          "lm_head")
            if ".attention.wqkv." in name:
                parts = _wqkv_by_forward(tensor, llm["num_attention_heads"], llm["num_key_value_heads"])
                for proj, piece in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                    out[name.replace("attention.wqkv", f"self_attn.{proj}")] = piece
                continue
        out[name] = tensor
    return out


def hf_internvl(checkpoint, config: dict, image_token_id: int) -> InternVLForConditionalGeneration:
    from safetensors.torch import load_file

    vc, llm = config["vision_config"], config["llm_config"]
    internlm2 = llm["architectures"][0] == "InternLM2ForCausalLM"
    text = {k: llm[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
                                "rope_theta")}
    text |= {"model_type": "llama", "attention_bias": llm["bias"]} if internlm2 else {"model_type": "qwen2"}
    hf_config = InternVLConfig(
        vision_config={"hidden_size": vc["hidden_size"], "num_hidden_layers": vc["num_hidden_layers"],
                       "num_attention_heads": vc["num_attention_heads"], "intermediate_size": vc["intermediate_size"],
                       "image_size": [vc["image_size"]] * 2, "patch_size": [vc["patch_size"]] * 2,
                       "attention_bias": vc["qkv_bias"], "use_qk_norm": vc["qk_normalization"],
                       "norm_type": vc["norm_type"], "layer_norm_eps": vc["layer_norm_eps"], "hidden_act": "gelu"},
        text_config=text, image_token_id=image_token_id, downsample_ratio=config["downsample_ratio"],
        image_seq_length=(vc["image_size"] // vc["patch_size"]) ** 2 // 4, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False)
    model = InternVLForConditionalGeneration(hf_config).eval()
    weights = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        weights |= load_file(str(shard))
    result = model.load_state_dict(chat_to_hf(weights, llm), strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    return model


@pytest.fixture(scope="module", params=[
    pytest.param("qwen2", id="mini-qwen2"),
    pytest.param("internlm2", id="8b-internlm2-bf16-qknorm", marks=pytest.mark.slow),
])
def internvl_chat(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    checkpoint = write_internvl_chat(root / "ckpt", internlm2=request.param == "internlm2",
                                     qk_norm=request.param == "internlm2", seed=11)
    package = export_package(checkpoint, root / "pkg", max_seq_len=1024)
    return checkpoint, package


def test_internvl_chat_matches_transformers_internvl(internvl_chat) -> None:
    import json

    checkpoint, package = internvl_chat
    assert detect_layout(checkpoint) == "internvl_chat"
    config = json.loads((checkpoint / "config.json").read_text())
    pipe = load_package(package)
    tokenizer, spec = pipe.tokenizer, pipe.manifest.prompt
    image = fundus_like(150, 100, seed=1)
    answer = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=NEW_TOKENS))

    # Reference prompt: the internvl2_5 template with FundusExpert's system prompt, rendered by hand.
    pixels = patchify(image, pipe.manifest.preprocessing).pixel_values
    assert pixels.shape[0] == answer.num_tiles == 7, "150x100 (ratio 1.5) under max_dynamic_patch 6: 3x2 + thumbnail"
    image_tokens = "<img>" + "<IMG_CONTEXT>" * (16 * pixels.shape[0]) + "</img>"
    text = (f"<|im_start|>system\n{FUNDUSEXPERT_SYSTEM}<|im_end|>\n<|im_start|>user\n{image_tokens}\n{QUESTION}"
            "<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if config["llm_config"]["architectures"][0] == "InternLM2ForCausalLM":
        ids = [tokenizer.token_to_id("<s>"), *ids]
    hf_model = hf_internvl(checkpoint, config, tokenizer.token_to_id("<IMG_CONTEXT>"))
    theirs = hf_greedy(hf_model, ids, NEW_TOKENS, pixel_values=torch.from_numpy(pixels))
    assert spec.stop_token_ids == [tokenizer.token_to_id("<|im_end|>")]
    assert_same_tokens(answer.token_ids, theirs, set(spec.stop_token_ids))


def test_internlm2_wqkv_split_matches_the_forward_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim, hidden = 8, 2, 4, 16
    wqkv = torch.randn((heads + 2 * kv_heads) * head_dim, hidden, generator=gen)
    for ours, reference in zip(split_wqkv(wqkv, heads, kv_heads), _wqkv_by_forward(wqkv, heads, kv_heads),
                               strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


# -- LLaVA + dense connector (EyecareGPT style) -----------------------------------------------------------

def _load_all(checkpoint) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(checkpoint.glob("*.safetensors")):
        weights |= {k: v.float() for k, v in load_file(str(shard)).items()}
    return weights


def llava_dense_reference(checkpoint, config: dict, image: np.ndarray, question: str, tokenizer) -> list[int]:
    """The EyecareGPT forward restated with transformers modules and direct tensor maths."""
    from transformers import Phi3Config, Phi3ForCausalLM, SiglipVisionConfig, SiglipVisionModel
    from transformers.models.llava_onevision.modeling_llava_onevision import get_anyres_image_grid_shape, unpad_image

    weights = _load_all(checkpoint)
    tower = SiglipVisionModel(SiglipVisionConfig(**{k: v for k, v in SIGLIP_TINY.items() if k != "model_type"},
                                               vision_use_head=False))
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower_weights = {k.removeprefix(prefix): v for k, v in weights.items()
                     if k.startswith(prefix) and ".head." not in k}
    result = tower.load_state_dict(tower_weights, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    pinpoints = [tuple(p) for p in config["image_grid_pinpoints"]]
    tile = SIGLIP_TINY["image_size"]
    pixels = patchify(image, TilingConfig(policy="anyres", tile_size=tile, grid_pinpoints=pinpoints,
                                          mean=SIGLIP_MEAN, std=SIGLIP_STD)).pixel_values
    with torch.inference_mode():
        hs = tower(pixel_values=torch.from_numpy(pixels), output_hidden_states=True).hidden_states
        # Dense Connector dci: base = hidden_states[select_layer], then the means of the two halves of the
        # first 2 * (L // 2) hidden states (CLIP-L: [0:12], [12:24]; SigLIP-27: [0:13], [13:26]).
        half = SIGLIP_TINY["num_hidden_layers"] // 2
        features = torch.cat([hs[config["mm_vision_select_layer"]], torch.stack(hs[:half]).mean(0),
                              torch.stack(hs[half:2 * half]).mean(0)], dim=-1)
        hidden = torch.nn.functional.gelu(features @ weights["model.mm_projector.0.weight"].T
                                          + weights["model.mm_projector.0.bias"])
        embeds = hidden @ weights["model.mm_projector.2.weight"].T + weights["model.mm_projector.2.bias"]
        # spatial_unpad (reference 2.4) with transformers' grid-shape and unpad helpers ((height, width) order)
        height, width = image.shape[:2]
        rows, cols = get_anyres_image_grid_shape((height, width), [[h, w] for w, h in pinpoints], tile)
        side = int(embeds.shape[1] ** 0.5)
        grid = embeds[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, (height, width))
        newline = weights["model.image_newline"][:, None, None].expand(-1, grid.shape[1], 1)
        grid = torch.cat([grid, newline], dim=-1).flatten(1, 2).transpose(0, 1)
        image_features = torch.cat([embeds[0], grid])

        llm = Phi3ForCausalLM(Phi3Config(**PHI3_TINY)).eval()
        llm_weights = {k: v for k, v in weights.items() if k.startswith(("model.embed_tokens", "model.layers",
                                                                         "model.norm", "lm_head"))}
        result = llm.load_state_dict(llm_weights, strict=False)
        assert not result.missing_keys and not result.unexpected_keys, result
        text = f"<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\n{question}<|end|>\n<|assistant|>\n"
        before, after = text.split("<image>")
        embed = llm.get_input_embeddings()
        sequence = torch.cat([embed(torch.tensor(tokenizer.encode(before, add_special_tokens=False).ids)),
                              image_features, embed(torch.tensor(tokenizer.encode(after, add_special_tokens=False).ids))])
        tokens = []
        for _ in range(NEW_TOKENS):
            token = int(llm(inputs_embeds=sequence[None]).logits[0, -1].argmax())
            tokens.append(token)
            sequence = torch.cat([sequence, embed(torch.tensor([token]))])
    return tokens


@pytest.fixture(scope="module")
def llava_dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    checkpoint = write_llava_phi3_dense(root / "ckpt", seed=5)
    return checkpoint, export_package(checkpoint, root / "pkg", max_seq_len=1024)


@pytest.mark.parametrize("size", [(90, 40), (40, 75), (64, 64)])
def test_llava_dense_anyres_matches_direct_formula(llava_dense, size: tuple[int, int]) -> None:
    import json

    checkpoint, package = llava_dense
    assert detect_layout(checkpoint) == "llava"
    config = json.loads((checkpoint / "config.json").read_text())
    pipe = load_package(package)
    assert pipe.manifest.prompt.image_layout == "anyres_unpad"
    image = fundus_like(*size, seed=size[0])
    answer = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=NEW_TOKENS))
    theirs = llava_dense_reference(checkpoint, config, image, QUESTION, pipe.tokenizer)
    assert_same_tokens(answer.token_ids, theirs, set(pipe.manifest.prompt.stop_token_ids))
    # the PyTorch reference model (models.assembly) agrees with the runtime's NumPy assembly
    model = load(checkpoint)
    pixels = torch.from_numpy(patchify(image, model.config.tiling).pixel_values)
    with torch.inference_mode():
        torch_tokens = model.image_tokens(pixels, [size])
    ids = np.asarray(answer.token_ids)
    assert torch_tokens.shape[0] == int(answer.timings["prompt_tokens"]) - len(
        pipe.tokenizer.encode(f"<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n\n{QUESTION}<|end|>\n"
                              "<|assistant|>\n", add_special_tokens=False).ids), ids


def test_llava_without_tower_weights_names_mm_vision_tower(tmp_path) -> None:
    import json

    checkpoint = write_llava_phi3_dense(tmp_path / "ckpt", with_tower=False)
    # the tower directory holds a config but no weights
    with pytest.raises(CheckpointError, match="mm_vision_tower 'siglip-tiny-patch8-32' has none"):
        load(checkpoint)
    # a hub id, as released checkpoints say: nothing to read locally
    config = json.loads((checkpoint / "config.json").read_text())
    config |= {"mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 3 * 1152,
               "image_grid_pinpoints": [[384, 768], [768, 384]]}
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mm_vision_tower 'google/siglip-so400m-patch14-384'; downloads"):
        load(checkpoint)


# -- transformers-native directories (save_pretrained output) ---------------------------------------------

def _save_hf(model: torch.nn.Module, root, tokenizer) -> None:
    model.save_pretrained(str(root))
    (root / "tokenizer.json").write_text(tokenizer.to_str())


def test_hf_internvl_directory_matches_transformers(tmp_path) -> None:
    from _layout_fixtures import tokenizer as make_tokenizer

    tok = make_tokenizer()
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 600, "max_position_embeddings": 2048}
    hf_config = InternVLConfig(
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
                       "image_size": [64, 64], "patch_size": [8, 8], "attention_bias": True},
        text_config=text, image_token_id=tok.token_to_id("<IMG_CONTEXT>"), image_seq_length=16,
        downsample_ratio=0.5, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf_model = InternVLForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 10) + (p.ndim == 1) * 1.0)
    _save_hf(hf_model, tmp_path, tok)
    assert detect_layout(tmp_path) == "hf_internvl"
    ours = load(tmp_path)
    image = fundus_like(130, 64, seed=2)
    pixels = torch.from_numpy(patchify(image, ours.config.tiling).pixel_values)
    from fundusrt.prompt import build_input_ids

    ids = build_input_ids(ours.prompt, tok, QUESTION, [16 * pixels.shape[0]]).tolist()
    theirs = hf_greedy(hf_model, ids, NEW_TOKENS, pixel_values=pixels)
    mine = ours.generate(ids, pixels, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    assert mine == theirs


def test_hf_llava_onevision_directory_matches_transformers(tmp_path) -> None:
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    from _layout_fixtures import tokenizer as make_tokenizer

    tok = make_tokenizer("<image>")
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 600, "max_position_embeddings": 2048}
    vision = {k: v for k, v in SIGLIP_TINY.items()}
    hf_config = LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"), video_token_index=599,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_1",
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64], [64, 96], [96, 96]], tie_word_embeddings=False)
    torch.manual_seed(1)
    hf_model = LlavaOnevisionForConditionalGeneration(hf_config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.copy_(torch.randn_like(p) / (p.shape[-1] ** 0.5 if p.ndim > 1 else 10) + (p.ndim == 1) * 1.0)
    _save_hf(hf_model, tmp_path, tok)
    assert detect_layout(tmp_path) == "hf_llava_onevision"
    ours = load(tmp_path)
    assert ours.config.anyres_max_tiles == 1 and ours.config.image_layout == "anyres_unpad"
    image = fundus_like(90, 80, seed=4)  # 3x3 grid: anyres_max_1 shrinks the unpadded map bilinearly
    pixels = torch.from_numpy(patchify(image, ours.config.tiling).pixel_values)
    with torch.inference_mode():
        count = ours.image_tokens(pixels, [(90, 80)]).shape[0]
    from fundusrt.prompt import build_input_ids

    ids = build_input_ids(ours.prompt, tok, QUESTION, [count]).tolist()
    theirs = hf_greedy(hf_model, ids, NEW_TOKENS, pixel_values=pixels[None], image_sizes=torch.tensor([[80, 90]]))
    mine = ours.generate(ids, pixels, max_new_tokens=NEW_TOKENS, stop_token_ids=[], image_sizes=[(90, 80)])
    assert mine == theirs


@pytest.mark.parametrize(("size", "max_tiles"), [((90, 80), 1), ((40, 75), 0), ((96, 33), 2)])
def test_numpy_assembly_matches_torch_reference(size: tuple[int, int], max_tiles: int) -> None:
    from fundusrt.kernels.tiling import plan_tiles
    from fundusrt.models.assembly import anyres_unpad
    from fundusrt.runtime.assembly import assemble_anyres_unpad

    cfg = TilingConfig(policy="anyres", tile_size=32, grid_pinpoints=[(32, 64), (64, 32), (64, 64), (96, 96)],
                       mean=SIGLIP_MEAN, std=SIGLIP_STD)
    plan = plan_tiles(*size, cfg)
    gen = torch.Generator().manual_seed(size[0])
    embeds = torch.randn(plan.num_tiles, 16, 8, generator=gen)
    newline = torch.randn(8, generator=gen)
    reference = anyres_unpad(embeds, plan.grid, plan.source_size, newline, max_tiles)
    ours = assemble_anyres_unpad(embeds.numpy(), plan, newline.numpy(), max_tiles)
    assert ours.shape == tuple(reference.shape)
    np.testing.assert_allclose(ours, reference.numpy(), rtol=0, atol=1e-5)

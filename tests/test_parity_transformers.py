"""The PyTorch reference against transformers' own VLM classes and their own `generate()`.

Our weights are mapped into `LlavaOnevisionForConditionalGeneration` (SigLIP + dense connector) and
`InternVLForConditionalGeneration` (InternViT + pixel shuffle) with a hand-written name mapping;
both sides then decode greedily from the same prompt and images and must agree token for token.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)

from fundusrt.config import ConnectorConfig  # noqa: E402
from fundusrt.models.lvlm import LVLM  # noqa: E402
from fundusrt.models.tiny import build_tiny_model, tiny_config  # noqa: E402
from fundusrt.models.tokenizer import build_tokenizer  # noqa: E402
from fundusrt.prompt import build_input_ids  # noqa: E402

NEW_TOKENS = 40
QUESTION = "Compare the two eyes: is there diabetic retinopathy?"


def _language_weights(model: LVLM) -> dict[str, torch.Tensor]:
    """Our `language_model.model.*` / `language_model.lm_head` -> transformers 5 in-memory VLM names."""
    mapped = {}
    for name, tensor in model.language_model.state_dict().items():
        if name.startswith("model."):
            mapped["model.language_model." + name.removeprefix("model.")] = tensor
        else:
            mapped[name] = tensor  # lm_head.weight
    return mapped


def _load_exactly(hf_model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    result = hf_model.load_state_dict(weights, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result


def _hf_greedy(hf_model: torch.nn.Module, ids: torch.Tensor, **image_kwargs: object) -> list[int]:
    out = hf_model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], do_sample=False,
                            max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
                            pad_token_id=0, **image_kwargs)
    return out[0, ids.shape[0]:].tolist()


def _llava_onevision(model: LVLM) -> LlavaOnevisionForConditionalGeneration:
    """Our single-layer-group dense model as LLaVA-OneVision.

    OneVision concatenates `vision_feature_layer=[-1, a, b]` on channels: our dense formula
    [hs[-1], mean(hs[a]), mean(hs[b])] when each group holds one layer. OneVision's multi-image mode
    (batch_num_images > 1) encodes each image as one un-split tile followed by one `image_newline`
    embedding; mapping `image_newline` to our `</img>` embedding makes its sequence equal to ours
    (`<img>` + tile tokens + `</img>`), with the prompt's `</img>` ids turned into image tokens.
    """
    text = model.config.text
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", **model.vision.config.to_dict()},
        text_config={"model_type": text.type, **text.config},
        image_token_index=model.image_token_id, video_token_index=text.vocab_size - 1,
        vision_feature_layer=[model.config.connector.feature_layer, *(g[0] for g in model.config.connector.layer_groups)],
        vision_feature_select_strategy="full", image_grid_pinpoints=[[model.config.vision.image_size] * 2],
        projector_hidden_act="gelu", multimodal_projector_bias=True, tie_word_embeddings=False,
    )
    hf_model = LlavaOnevisionForConditionalGeneration(config).eval()
    image_end_id = model.tokenizer.token_to_id(model.config.image_end)
    weights = {"model.vision_tower." + k: v for k, v in model.vision.state_dict().items()}
    weights |= {"model.multi_modal_projector." + k: v for k, v in model.connector.state_dict().items()}
    weights |= _language_weights(model)
    weights["model.image_newline"] = model.embed(torch.tensor(image_end_id)).detach()
    _load_exactly(hf_model, weights)
    return hf_model


def _internvl(model: LVLM) -> InternVLForConditionalGeneration:
    """Our InternViT + pixel-shuffle model as transformers' InternVL (flat, tokens_per_tile per tile)."""
    text = model.config.text
    config = InternVLConfig(
        vision_config=model.vision.config.to_dict(), text_config={"model_type": text.type, **text.config},
        image_token_id=model.image_token_id, image_seq_length=model.config.tokens_per_tile,
        downsample_ratio=model.config.connector.downsample_ratio, projector_hidden_act="gelu",
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=False,
    )
    hf_model = InternVLForConditionalGeneration(config).eval()
    weights = {"model.vision_tower." + k: v for k, v in model.vision.state_dict().items()}
    weights |= {"model.multi_modal_projector." + k: v for k, v in model.connector.state_dict().items()}
    weights |= _language_weights(model)
    _load_exactly(hf_model, weights)
    return hf_model


def test_siglip_dense_matches_llava_onevision_generate() -> None:
    vocab = build_tokenizer().get_vocab_size()
    config = tiny_config("siglip-dense", vocab)
    config = dataclasses.replace(config, connector=ConnectorConfig(type="dense", feature_layer=-1,
                                                                   layer_groups=[[1], [3]]))
    model = build_tiny_model(config=config, seed=3)
    hf_model = _llava_onevision(model)
    size = config.vision.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids = torch.from_numpy(build_input_ids(model.prompt, model.tokenizer, "<image><image>" + QUESTION,
                                           [config.tokens_per_tile] * 2))
    ours = model.generate(ids, pixels, max_new_tokens=NEW_TOKENS, stop_token_ids=[])

    hf_ids = ids.clone()
    hf_ids[hf_ids == model.tokenizer.token_to_id(config.image_end)] = model.image_token_id
    with torch.inference_mode():
        theirs = _hf_greedy(hf_model, hf_ids, pixel_values=pixels, image_sizes=torch.tensor([[size, size]] * 2),
                            batch_num_images=torch.tensor([2]))
    assert ours == theirs, f"first divergence at step {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}"
    assert len(ours) == NEW_TOKENS and len(set(ours)) > 8, f"degenerate reference output {ours}"


def test_internvit_shuffle_matches_internvl_generate() -> None:
    model = build_tiny_model("internvit-shuffle", seed=4)
    size, tiles = model.config.vision.image_size, 3
    pixels = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(1))
    ids = torch.from_numpy(build_input_ids(model.prompt, model.tokenizer, QUESTION,
                                           [tiles * model.config.tokens_per_tile]))
    ours = model.generate(ids, pixels, max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    with torch.inference_mode():
        theirs = _hf_greedy(_internvl(model), ids, pixel_values=pixels)
    assert ours == theirs, f"first divergence at step {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}"
    assert len(ours) == NEW_TOKENS and len(set(ours)) > 8, f"degenerate reference output {ours}"


def test_image_features_match_transformers() -> None:
    """Per-token check behind the generate test: our image embeddings == InternVL's get_image_features."""
    model = build_tiny_model("internvit-shuffle", seed=5)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours = model.image_embeds(pixels)
        theirs = _internvl(model).model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                                           vision_feature_select_strategy="default").pooler_output
    diff = float((ours - theirs.reshape(ours.shape)).abs().max())
    assert diff <= 1e-5, f"image embeddings differ from transformers' InternVL by {diff:.3g}"

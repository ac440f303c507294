"""The PyTorch reference model: configs, connectors (direct formulas), tokenizer, checkpoint I/O, generation."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from fundusrt.config import ModelConfig, VisionConfig  # noqa: E402
from fundusrt.models import CheckpointError, detect_layout, load  # noqa: E402
from fundusrt.models.tiny import FAMILIES, build_tiny_model, tiny_config, write_tiny_checkpoint  # noqa: E402
from fundusrt.models.tokenizer import SPECIAL_TOKENS, build_tokenizer  # noqa: E402
from fundusrt.prompt import build_input_ids  # noqa: E402


@pytest.fixture(scope="module")
def dense_model():
    return build_tiny_model("siglip-dense", seed=0)


# -- config -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_model_config_round_trips_through_json(family: str) -> None:
    config = tiny_config(family, 512)
    data = json.loads(json.dumps(config.to_dict()))
    data["a_future_key"] = 1
    data["vision"]["another_future_key"] = 2
    assert ModelConfig.from_dict(data) == config


def test_tokens_per_tile_follow_the_published_formulas() -> None:
    # InternViT-300M at 448 with pixel shuffle 0.5: 256 per tile; SigLIP-so400m at 384: 729 per tile.
    internvit = tiny_config("internvit-shuffle", 512)
    internvit = ModelConfig.from_dict({**internvit.to_dict(),
                                       "vision": {**internvit.to_dict()["vision"], "image_size": 448, "patch_size": 14},
                                       "tiling": {**internvit.tiling.to_dict(), "tile_size": 448}})
    assert internvit.tokens_per_tile == 256
    siglip = tiny_config("siglip-dense", 512)
    siglip = ModelConfig.from_dict({**siglip.to_dict(),
                                    "vision": {**siglip.to_dict()["vision"], "image_size": 384, "patch_size": 14},
                                    "tiling": {**siglip.tiling.to_dict(), "tile_size": 384}})
    assert siglip.tokens_per_tile == 729


@pytest.mark.parametrize(("change", "message"), [
    ({"connector": {"type": "dense", "layer_groups": []}}, "layer_groups"),
    ({"connector": {"type": "dense", "layer_groups": [[0, 9]]}}, "out of range"),
    ({"connector": {"type": "mlp", "layer_groups": [[1]]}}, "only applies"),
    ({"connector": {"type": "pixel_shuffle", "layer_groups": [], "downsample_ratio": 0.3}}, "1/k"),
    ({"vision": {"type": "vit"}}, "vision.type"),
    ({"vision": {"image_size": 4}}, "smaller than patch_size"),
    ({"tiling": {"tile_size": 64}}, "tile_size"),
])
def test_invalid_configs_say_what_is_wrong(change: dict, message: str) -> None:
    data = tiny_config("siglip-dense", 512).to_dict()
    for section, values in change.items():
        data[section] = {**data[section], **values}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(data)


def test_pixel_shuffle_on_an_odd_grid_is_rejected() -> None:
    data = tiny_config("siglip-dense", 512).to_dict()
    data["connector"] = {"type": "pixel_shuffle", "downsample_ratio": 0.5}
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig.from_dict(data)  # SigLIP 56/8 = 7x7 grid


def test_vision_config_defaults_the_activation_per_tower() -> None:
    assert VisionConfig(type="siglip").hidden_act == "gelu_pytorch_tanh"
    assert VisionConfig(type="internvit", image_size=448).hidden_act == "gelu"


# -- connectors against hand formulas ----------------------------------------------------------------

def test_dense_connector_averages_multi_layer_groups(dense_model) -> None:
    assert dense_model.config.connector.layer_groups == [[0, 1], [2, 3]]
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hs = dense_model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = torch.cat([hs[4], (hs[0] + hs[1]) / 2, (hs[2] + hs[3]) / 2], dim=-1)
        c = dense_model.connector
        expected = F.linear(F.gelu(F.linear(features, c.linear_1.weight, c.linear_1.bias)),
                            c.linear_2.weight, c.linear_2.bias)
        got = dense_model.image_embeds(pixels)
    assert got.shape == (2, 49, 64)
    diff = float((got - expected).abs().max())
    assert diff <= 1e-5, f"dense connector differs from the hand formula by {diff:.3g}"


def test_pixel_shuffle_merges_2x2_blocks_row_major() -> None:
    model = build_tiny_model("internvit-shuffle", seed=1)
    grid = torch.randn(1, 8, 8, 5)  # (tile, row, column, channel)
    shuffled = model.connector.shuffle(grid.reshape(1, 64, 5))
    assert shuffled.shape == (1, 16, 20)
    for i in range(4):
        for j in range(4):
            block = torch.cat([grid[0, 2 * i, 2 * j], grid[0, 2 * i, 2 * j + 1],
                               grid[0, 2 * i + 1, 2 * j], grid[0, 2 * i + 1, 2 * j + 1]])
            assert torch.equal(shuffled[0, 4 * i + j], block), f"cell ({i}, {j})"


def test_internvit_features_drop_the_cls_token() -> None:
    model = build_tiny_model("internvit-shuffle", seed=1)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        last = model.vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(model.vision_features(pixels), last[:, 1:])


# -- tokenizer and prompt ----------------------------------------------------------------------------

def test_tokenizer_keeps_special_tokens_whole_and_round_trips_text() -> None:
    tokenizer = build_tokenizer()
    ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS)))
    text = "<|im_start|>user\n<img><IMG_CONTEXT></img> Soft drusen at the macula, 0.7 C/D ratio 😀<|im_end|>"
    encoded = tokenizer.encode(text)
    for token_id in ids[1:]:
        assert encoded.ids.count(token_id) == text.count(SPECIAL_TOKENS[token_id]), SPECIAL_TOKENS[token_id]
    assert tokenizer.decode(encoded.ids, skip_special_tokens=False) == text


def test_prompt_spec_uses_the_tokenizer_ids(dense_model) -> None:
    spec, tokenizer = dense_model.prompt, dense_model.tokenizer
    assert spec.image_token_id == tokenizer.token_to_id("<IMG_CONTEXT>")
    assert spec.stop_token_ids == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    assert spec.tokens_per_tile == 49
    ids = build_input_ids(spec, tokenizer, "Describe.", [98]).tolist()
    assert ids.count(spec.image_token_id) == 98
    assert tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\n")


def test_splice_rejects_a_feature_count_mismatch(dense_model) -> None:
    ids = torch.from_numpy(build_input_ids(dense_model.prompt, dense_model.tokenizer, "Describe.", [49]))[None]
    with pytest.raises(ValueError, match="49 image tokens but the images give 98"):
        dense_model.prompt_embeds(ids, torch.randn(2, 3, 56, 56))


# -- generation ----------------------------------------------------------------------------------------

def test_kv_cached_greedy_equals_full_recomputation(dense_model) -> None:
    pixels = torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    ids = torch.from_numpy(build_input_ids(dense_model.prompt, dense_model.tokenizer, "Describe the disc.", [49]))
    tokens = dense_model.generate(ids, pixels, max_new_tokens=24, stop_token_ids=[])
    margins = []
    with torch.no_grad():
        embeds = dense_model.prompt_embeds(ids[None], pixels)
        expected = []
        for _ in range(24):
            logits = dense_model.language_model(inputs_embeds=embeds).logits[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]))
            expected.append(int(logits.argmax()))
            embeds = torch.cat([embeds, dense_model.embed(torch.tensor([[expected[-1]]]))], dim=1)
    assert tokens == expected
    assert len(set(tokens)) >= 8, f"tiny model decodes degenerate text: {tokens}"
    assert min(margins) > 1e-3, f"argmax near-tie (margin {min(margins):.2g}): the tiny init is too flat"


def test_generation_stops_at_a_stop_token(dense_model) -> None:
    ids = build_input_ids(dense_model.prompt, dense_model.tokenizer, "Grade?", [])
    free = dense_model.generate(ids, max_new_tokens=10, stop_token_ids=[])
    stopped = dense_model.generate(ids, max_new_tokens=10, stop_token_ids=[free[3]])
    assert stopped == free[: free.index(free[3]) + 1]


# -- native checkpoint -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_native_checkpoint_round_trip(tmp_path, family: str) -> None:
    path = write_tiny_checkpoint(tmp_path / family, family=family, seed=2)
    assert detect_layout(path) == "native"
    assert json.loads((path / "config.json").read_text())["format"] == "fundusrt"
    reference = build_tiny_model(family, seed=2)
    loaded = load(path)
    assert not any(p.is_meta for p in loaded.parameters())
    assert loaded.state_dict().keys() == reference.state_dict().keys()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert all(k.split(".")[0] in ("vision", "connector", "language_model") for k in loaded.state_dict())
    ids = build_input_ids(loaded.prompt, loaded.tokenizer, "Describe.", [])
    assert loaded.generate(ids, max_new_tokens=8) == reference.generate(ids, max_new_tokens=8)


def test_load_casts_to_the_requested_dtype(tmp_path) -> None:
    path = write_tiny_checkpoint(tmp_path / "ckpt", family="siglip-mlp")
    model = load(path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = build_input_ids(model.prompt, model.tokenizer, "Describe.", [49])
    assert len(model.generate(ids, torch.randn(1, 3, 56, 56), max_new_tokens=4, stop_token_ids=[])) == 4


def test_loading_bad_checkpoints_explains_the_problem(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not a directory"):
        load(tmp_path / "missing")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llava"}')
    with pytest.raises(CheckpointError, match="no checkpoint layout"):
        load(tmp_path / "other")

    path = write_tiny_checkpoint(tmp_path / "ckpt", family="siglip-mlp")
    config = json.loads((path / "config.json").read_text())
    config["text"]["config"]["num_hidden_layers"] = 3
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing.*language_model.model.layers.2"):
        load(path)
    config["text"]["config"]["num_hidden_layers"] = 2
    config["text"]["config"]["intermediate_size"] = 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load(path)
    config["text"]["config"]["intermediate_size"] = 128
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load(path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load(path)

"""transformers-native InternVL and LLaVA-OneVision directories (what `save_pretrained` writes), exported
to a package, run through onnxruntime (fundusrt.load_package + ask) and matched token for token against
transformers' own `generate()` of the very model that wrote the directory. The reference prompt is
rendered by hand from the published templates and its image-token count comes from transformers."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches  # noqa: E402

from _layout_fixtures import (  # noqa: E402
    assert_same_tokens,
    fundus_like,
    hf_greedy,
    write_hf_internvl,
    write_hf_llava_onevision,
)
from fundusrt.config import GenerationConfig  # noqa: E402
from fundusrt.export.package import export_package  # noqa: E402
from fundusrt.kernels import patchify  # noqa: E402
from fundusrt.models import detect_layout  # noqa: E402
from fundusrt.models.layouts.internvl_chat import FUNDUSEXPERT_SYSTEM  # noqa: E402
from fundusrt.runtime.pipeline import load_package  # noqa: E402

NEW_TOKENS = 20
QUESTION = "Is there diabetic retinopathy?"
def _chatml(system: str, user: str) -> str:
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def hf_internvl(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_internvl")
    model, tok = write_hf_internvl(root / "ckpt", seed=3)
    return model, tok, export_package(root / "ckpt", root / "pkg", max_seq_len=512)


@pytest.fixture(scope="module")
def hf_onevision(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_onevision")
    model, tok = write_hf_llava_onevision(root / "ckpt", seed=4)
    return model, tok, export_package(root / "ckpt", root / "pkg", max_seq_len=512)


def test_hf_internvl_bf16_sharded_package_matches_transformers_generate(hf_internvl) -> None:
    model, tok, package = hf_internvl
    checkpoint = package.parent / "ckpt"
    assert detect_layout(checkpoint) == "hf_internvl"
    assert len(list(checkpoint.glob("*.safetensors"))) > 1, "the fixture should be sharded"
    pipe = load_package(package)
    assert pipe.manifest.source["layout"] == "hf_internvl"
    image = fundus_like(130, 64, seed=2)
    answer = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=NEW_TOKENS))

    pixels = patchify(image, pipe.manifest.preprocessing).pixel_values
    assert pixels.shape[0] == answer.num_tiles == 3, "130x64 (ratio ~2) under max_patches 12: 2x1 grid + thumbnail"
    image_text = "<img>" + "<IMG_CONTEXT>" * (model.config.image_seq_length * pixels.shape[0]) + "</img>"
    ids = tok.encode(_chatml(FUNDUSEXPERT_SYSTEM, f"{image_text}\n{QUESTION}"), add_special_tokens=False).ids
    theirs = hf_greedy(model, ids, NEW_TOKENS, pixel_values=torch.from_numpy(pixels))
    assert pipe.manifest.prompt.stop_token_ids == [tok.token_to_id("<|im_end|>")]
    assert_same_tokens(answer.token_ids, theirs, set(pipe.manifest.prompt.stop_token_ids))


# 90x80: a 3x3 grid whose unpadded map anyres_max_1 shrinks bilinearly; 100x40 a wide 3x2 grid.
@pytest.mark.parametrize("size", [(90, 80), (100, 40)])
def test_hf_llava_onevision_sharded_package_matches_transformers_generate(hf_onevision, size) -> None:
    model, tok, package = hf_onevision
    assert detect_layout(package.parent / "ckpt") == "hf_llava_onevision"
    pipe = load_package(package)
    assert pipe.manifest.prompt.image_layout == "anyres_unpad"
    image = fundus_like(*size, seed=size[0])
    answer = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=NEW_TOKENS))

    pixels = torch.from_numpy(patchify(image, pipe.manifest.preprocessing).pixel_values)[None]
    image_sizes = torch.tensor([[size[1], size[0]]])  # transformers: (height, width)
    assert answer.num_tiles == pixels.shape[1] == image_size_to_num_patches(
        image_sizes[0], model.config.image_grid_pinpoints, model.config.vision_config.image_size)
    with torch.inference_mode():
        features = model.get_image_features(pixel_values=pixels, image_sizes=image_sizes).pooler_output
    count = sum(f.shape[0] for f in features)
    ids = tok.encode(_chatml("You are a helpful assistant.", "<image>" * count + f"\n{QUESTION}"),
                     add_special_tokens=False).ids
    assert int(answer.timings["prompt_tokens"]) == len(ids)
    theirs = hf_greedy(model, ids, NEW_TOKENS, pixel_values=pixels, image_sizes=image_sizes)
    assert_same_tokens(answer.token_ids, theirs, set(pipe.manifest.prompt.stop_token_ids))

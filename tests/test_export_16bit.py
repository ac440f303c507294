"""16-bit export (`fundusrt export --dtype fp16|bf16`).

References: the fp32 package of the same checkpoint (the fp16 package must answer with its greedy
tokens, and its logits within fp16 rounding), and the checkpoint's own dtype (a bf16 checkpoint is
loaded and exported without ever holding its weights in fp32).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from fundusrt.config import GenerationConfig
from fundusrt.export import export_package
from fundusrt.manifest import Manifest
from fundusrt.models.loader import load
from fundusrt.runtime.pipeline import load_package
from tests._dicom_fixtures import fundus_picture

QUESTIONS = ["Describe the image.", "Is there a haemorrhage?"]


def test_fp16_package_answers_like_the_fp32_one(tiny_package, tmp_path: Path) -> None:
    checkpoint, fp32 = tiny_package("internvit-shuffle", seed=0)
    fp16 = export_package(checkpoint, tmp_path / "fp16", dtype="fp16")
    assert Manifest.load(fp16).precision == "fp16"
    graph = onnx.load(str(fp16 / "decoder.onnx"))
    weights = [t for t in graph.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    reference, candidate = load_package(fp32, threads=1), load_package(fp16, threads=1)
    gen = GenerationConfig(max_new_tokens=16)
    for seed in range(3):
        image = fundus_picture(256, 256, seed=seed)
        for question in QUESTIONS:
            assert candidate.ask(image, question, gen).token_ids == reference.ask(image, question, gen).token_ids
    _, embeds = reference.prompt_embeds(reference.encode_image(image), QUESTIONS[0])
    reference.sessions.decoder.reset(), candidate.sessions.decoder.reset()
    want, got = reference.sessions.decoder.prefill(embeds), candidate.sessions.decoder.prefill(embeds)
    # fp16 keeps 11 significant bits: logits agree to about 1e-3 of their range.
    assert np.abs(want - got).max() <= 2e-3 * np.abs(want).max()


def test_bf16_checkpoint_is_never_held_in_fp32(tiny_package, tmp_path: Path) -> None:
    checkpoint = Path(shutil.copytree(tiny_package("internvit-shuffle", seed=0)[0], tmp_path / "bf16-ckpt"))
    for file in checkpoint.glob("*.safetensors"):
        tensors = load_file(str(file))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, str(file))
    model = load(checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    package = export_package(checkpoint, tmp_path / "bf16", dtype="bf16")
    graph = onnx.load(str(package / "decoder.onnx"))
    weights = [t for t in graph.graph.initializer if len(t.dims) == 2]
    assert weights and all(t.data_type == onnx.TensorProto.BFLOAT16 for t in weights)
    assert Manifest.load(package).precision == "bf16"


def test_unknown_dtype_is_refused(tiny_package, tmp_path: Path) -> None:
    from fundusrt.export.package import ExportError

    with pytest.raises(ExportError, match="dtype must be one of fp32, fp16, bf16"):
        export_package(tiny_package("internvit-shuffle", seed=0)[0], tmp_path / "x", dtype="int3")
    assert not (tmp_path / "x").exists()

"""Export into a model package, checked with onnxruntime sessions used directly (not fundusrt.runtime)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from fundusrt.cli import main as cli_main  # noqa: E402
from fundusrt.export import package as package_module  # noqa: E402
from fundusrt.export.package import ExportError, export_package  # noqa: E402
from fundusrt.manifest import Manifest, PackageError  # noqa: E402
from fundusrt.models import CheckpointError, load  # noqa: E402
from fundusrt.models.tiny import write_tiny_checkpoint  # noqa: E402
from fundusrt.prompt import build_input_ids  # noqa: E402

TOLERANCE = 1e-4


class Exported:
    """A tiny checkpoint, its PyTorch model and its package opened with raw ORT sessions."""

    def __init__(self, root, family: str, cli: bool) -> None:
        self.checkpoint = write_tiny_checkpoint(root / "ckpt", family=family, seed=7)
        self.package = root / "pkg"
        args = [str(self.checkpoint), "--out", str(self.package), "--max-seq-len", "512"]
        if cli:
            assert cli_main(["export", *args]) == 0
        else:
            export_package(self.checkpoint, self.package, max_seq_len=512)
        self.manifest = Manifest.load(self.package)
        self.model = load(self.checkpoint)
        self.sessions = {name: ort.InferenceSession(str(self.package / spec.file), providers=["CPUExecutionProvider"])
                         for name, spec in self.manifest.components.items()}

    def run(self, component: str, **inputs: np.ndarray) -> list[np.ndarray]:
        return self.sessions[component].run(None, inputs)


@pytest.fixture(scope="module", params=["siglip-dense", pytest.param("internvit-shuffle", marks=pytest.mark.slow)])
def exported(request, tmp_path_factory) -> Exported:
    return Exported(tmp_path_factory.mktemp(request.param), request.param, cli=request.param == "siglip-dense")


def _max_diff(a: np.ndarray, b: torch.Tensor) -> float:
    assert a.shape == tuple(b.shape), f"shape {a.shape} != {tuple(b.shape)}"
    return float(np.abs(a - b.numpy()).max())


# -- manifest --------------------------------------------------------------------------------------

def test_manifest_follows_the_component_contract(exported: Exported) -> None:
    m, config = exported.manifest, exported.model.config
    m.verify(exported.package)
    io = {name: ([t.name for t in spec.inputs], [t.name for t in spec.outputs]) for name, spec in m.components.items()}
    kv_in = [f"past_key_values.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    kv_out = [f"present.{i}.{kind}" for i in range(2) for kind in ("key", "value")]
    assert io == {
        "vision": (["pixel_values"], ["vision_features"]),
        "connector": (["vision_features"], ["image_embeds"]),
        "embed": (["input_ids"], ["inputs_embeds"]),
        "decoder": (["inputs_embeds", "attention_mask", "position_ids", *kv_in], ["logits", *kv_out]),
    }
    decoder = m.components["decoder"]
    assert decoder.outputs[0].shape == ["batch", 1, config.text.vocab_size]
    assert decoder.inputs[3].shape == ["batch", 2, "past_seq", 16]
    assert m.components["vision"].inputs[0].shape == ["num_tiles", 3, config.vision.image_size, config.vision.image_size]
    assert m.components["connector"].outputs[0].shape == ["num_tiles", config.tokens_per_tile, 64]
    assert (m.decoder.num_layers, m.decoder.num_kv_heads, m.decoder.head_dim, m.decoder.max_seq_len) == (2, 2, 16, 512)
    tokenizer = exported.model.tokenizer
    assert m.prompt.image_token_id == tokenizer.token_to_id("<IMG_CONTEXT>")
    assert m.prompt.stop_token_ids[0] == tokenizer.token_to_id("<|im_end|>")
    assert (m.prompt.image_start, m.prompt.image_end, m.prompt.tokens_per_tile) == ("<img>", "</img>",
                                                                                      config.tokens_per_tile)
    assert m.preprocessing == config.tiling
    assert {"torch", "transformers", "onnx", "fundusrt"} <= m.tool_versions.keys()
    assert (exported.package / m.tokenizer).read_text() == tokenizer.to_str()


def test_tampered_package_fails_verification(exported: Exported, tmp_path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in exported.package.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    with open(copy / "connector.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(PackageError, match="connector.onnx: sha256"):
        Manifest.load(copy).verify(copy)


# -- per-component parity ----------------------------------------------------------------------------

@pytest.mark.parametrize("num_tiles", [1, 3])
def test_vision_and_connector_match_pytorch(exported: Exported, num_tiles: int) -> None:
    size = exported.model.config.vision.image_size
    pixels = torch.randn(num_tiles, 3, size, size, generator=torch.Generator().manual_seed(num_tiles))
    with torch.no_grad():
        features = exported.model.vision_features(pixels)
        embeds = exported.model.connector(features)
    (ort_features,) = exported.run("vision", pixel_values=pixels.numpy())
    (ort_embeds,) = exported.run("connector", vision_features=ort_features)
    diffs = {"vision": _max_diff(ort_features, features), "connector": _max_diff(ort_embeds, embeds)}
    assert max(diffs.values()) <= TOLERANCE, f"max abs diff ORT vs PyTorch: {diffs}"


def test_embed_matches_pytorch(exported: Exported) -> None:
    ids = torch.randint(0, exported.manifest.decoder.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = exported.model.embed(ids)
    diff = _max_diff(exported.run("embed", input_ids=ids.numpy())[0], expected)
    assert diff <= TOLERANCE, f"embed max abs diff {diff:.3g}"


def test_decoder_prefill_and_decode_steps_match_pytorch(exported: Exported) -> None:
    from transformers import DynamicCache

    model, spec = exported.model, exported.manifest.decoder
    generator = torch.Generator().manual_seed(1)
    embeds = torch.randn(1, 9, spec.hidden_size, generator=generator)
    past = {n: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
            for i in range(spec.num_layers) for n in (spec.past_key % i, spec.past_value % i)}
    cache, total, diffs = DynamicCache(config=model.language_model.config), 0, []
    for step in range(4):  # prefill of 9 tokens, then 3 single-token steps on top of the cache
        new = embeds.shape[1]
        mask, positions = torch.ones(1, total + new, dtype=torch.long), torch.arange(total, total + new)[None]
        with torch.no_grad():
            logits, cache = model.decoder_step(embeds, mask, positions, cache)
        outputs = exported.run("decoder", inputs_embeds=embeds.numpy(), attention_mask=mask.numpy(),
                               position_ids=positions.numpy(), **past)
        diffs.append(_max_diff(outputs[0], logits))
        for i, layer in enumerate(cache.layers):
            diffs.append(_max_diff(outputs[1 + 2 * i], layer.keys))
            diffs.append(_max_diff(outputs[2 + 2 * i], layer.values))
        past = {n % i: outputs[1 + 2 * i + j] for i in range(spec.num_layers)
                for j, n in enumerate((spec.past_key, spec.past_value))}
        total += new
        embeds = torch.randn(1, 1, spec.hidden_size, generator=generator)
        assert outputs[1].shape[2] == total, f"step {step}: present length {outputs[1].shape[2]} != {total}"
    assert max(diffs) <= TOLERANCE, f"decoder max abs diff ORT vs PyTorch over 4 steps: {max(diffs):.3g}"


# -- token-level generation --------------------------------------------------------------------------

def _ort_greedy(exported: Exported, ids: np.ndarray, pixels: np.ndarray, max_new_tokens: int) -> list[int]:
    """A test-only greedy loop over the raw ORT sessions, splicing image embeddings like the runtime must."""
    spec, prompt = exported.manifest.decoder, exported.manifest.prompt
    (features,) = exported.run("vision", pixel_values=pixels)
    (image_embeds,) = exported.run("connector", vision_features=features)
    (embeds,) = exported.run("embed", input_ids=ids[None])
    embeds[0, ids == prompt.image_token_id] = image_embeds.reshape(-1, spec.hidden_size)
    past = {n % i: np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), np.float32)
            for i in range(spec.num_layers) for n in (spec.past_key, spec.past_value)}
    tokens: list[int] = []
    total = 0
    for _ in range(max_new_tokens):
        new = embeds.shape[1]
        outputs = exported.run("decoder", inputs_embeds=embeds, attention_mask=np.ones((1, total + new), np.int64),
                               position_ids=np.arange(total, total + new, dtype=np.int64)[None], **past)
        past = {n % i: outputs[1 + 2 * i + j] for i in range(spec.num_layers)
                for j, n in enumerate((spec.past_key, spec.past_value))}
        total += new
        tokens.append(int(outputs[0][0, -1].argmax()))
        (embeds,) = exported.run("embed", input_ids=np.array([[tokens[-1]]], np.int64))
    return tokens


def test_ort_greedy_tokens_equal_pytorch_reference(exported: Exported) -> None:
    model = exported.model
    size, tiles = model.config.vision.image_size, 3
    pixels = torch.randn(tiles, 3, size, size, generator=torch.Generator().manual_seed(5))
    ids = build_input_ids(exported.manifest.prompt, model.tokenizer, "Is there diabetic retinopathy?",
                          [tiles * exported.manifest.prompt.tokens_per_tile])
    expected = model.generate(ids, pixels, max_new_tokens=36, stop_token_ids=[])
    got = _ort_greedy(exported, ids, pixels.numpy(), 36)
    assert got == expected, f"ORT diverges from PyTorch at step {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}"
    assert len(set(expected)) > 8, f"degenerate reference output {expected}"


# -- failures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("failing") / "ckpt", family="siglip-mlp")


def test_bad_checkpoints_and_limits_fail_cleanly(tmp_path, checkpoint, capsys) -> None:
    assert cli_main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "pkg")]) == 1
    assert "not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint layout"):
        export_package(tmp_path / "empty", tmp_path / "pkg")
    with pytest.raises(ExportError, match="already exists"):
        export_package(checkpoint, tmp_path / "empty")
    with pytest.raises(ExportError, match="raise max_seq_len or lower max_tiles"):
        export_package(checkpoint, tmp_path / "pkg", max_seq_len=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_failed_export_leaves_no_partial_package(tmp_path, checkpoint, monkeypatch) -> None:
    real_export = package_module.export_component
    calls = []

    def fail_on_connector(component, path):  # vision.onnx is written for real first
        calls.append(path.name)
        if path.name == "connector.onnx":
            raise RuntimeError("simulated exporter crash")
        return real_export(component, path)

    monkeypatch.setattr(package_module, "export_component", fail_on_connector)
    with pytest.raises(RuntimeError, match="simulated"):
        export_package(checkpoint, tmp_path / "pkg")
    assert calls == ["vision.onnx", "connector.onnx"]
    assert list(tmp_path.iterdir()) == []


def test_manifest_json_has_no_machine_paths(exported: Exported) -> None:
    text = (exported.package / "manifest.json").read_text()
    assert str(exported.checkpoint.parent) not in text
    assert json.loads(text)["source"] == {"layout": "native", "checkpoint": "ckpt"}

"""`fundusrt inspect`: every checkpoint layout is described from its headers, with parameter counts checked
against the safetensors headers parsed by hand here and against the model `load` builds; broken checkpoints
(deleted shard, renamed, wrong-shaped or mis-split tensors, unknown configs) get errors naming the problem."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from _layout_fixtures import write_hf_internvl, write_hf_llava_onevision, write_internvl_chat, write_llava_phi3_dense
from fundusrt.models import CheckpointError, load
from fundusrt.models import cli as inspect_cli
from fundusrt.models.inspect import inspect_checkpoint
from fundusrt.models.tiny import write_tiny_checkpoint

# On-disk name -> component, per layout, restated from the shared reference (not from fundusrt's rules).
# First match wins; names no rule matches are "other".
DISK_COMPONENTS: dict[str, list[tuple[str, str]]] = {
    "native": [(r"^vision\.", "vision"), (r"^connector\.", "connector"), (r"^language_model\.", "language_model")],
    "internvl_chat": [(r"^vision_model\.", "vision"), (r"^mlp1\.", "connector"),
                      (r"^language_model\.", "language_model")],
    "llava": [(r"^model\.vision_tower\..*\.head\.", "other"), (r"^model\.vision_tower\.", "vision"),
              (r"^model\.mm_projector\.", "connector"), (r"^model\.image_newline$", "other"),
              (r"^(model|lm_head)\.", "language_model")],
    "hf": [(r"^(model\.)?vision_tower\..*head\.", "other"), (r"^(model\.)?vision_tower\.", "vision"),
           (r"^(model\.)?multi_modal_projector\.", "connector"),
           (r"^(model\.language_model|language_model|lm_head)\b", "language_model")],
}
SAFETENSORS_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def raw_headers(root: Path) -> dict[str, tuple[list[int], str]]:
    """name -> (shape, dtype) of every *.safetensors in `root`, parsed from the file format itself
    (8-byte little-endian header length, then a JSON header)."""
    headers = {}
    for file in sorted(root.glob("*.safetensors")):
        with file.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        headers |= {name: (entry["shape"], entry["dtype"]) for name, entry in header.items()}
    return headers


def expected_counts(root: Path, rules: list[tuple[str, str]]) -> dict[str, int]:
    counts = dict.fromkeys(("vision", "connector", "language_model", "other"), 0)
    for name, (shape, _) in raw_headers(root).items():
        part = next((p for pattern, p in rules if re.search(pattern, name)), "other")
        counts[part] += int(torch.Size(shape).numel())
    return counts | {"total": sum(counts.values())}


def model_counts(root: Path) -> dict[str, int]:
    """Parameters of the model `load` builds, per top-level submodule (image_newline is other); a tied
    head shares the embeddings' memory and counts once."""
    counts = dict.fromkeys(("vision", "connector", "language_model", "other"), 0)
    seen = set()
    for name, param in load(root).named_parameters():
        if param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        part = name.split(".")[0]
        counts[part if part in counts else "other"] += param.numel()
    return counts | {"total": sum(counts.values())}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    inspect_cli.add_arguments(parser)
    capsys.readouterr()  # drop what the fixture writers printed (save_pretrained's progress bar)
    code = inspect_cli.main(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


def _native(root: Path) -> Path:
    return write_tiny_checkpoint(root, family="internvit-shuffle", seed=1)


def _hf_internvl(root: Path, tie_word_embeddings: bool = False) -> Path:
    write_hf_internvl(root, tie_word_embeddings=tie_word_embeddings)
    return root


def _hf_onevision(root: Path) -> Path:
    write_hf_llava_onevision(root)
    return root


# (id, writer, layout, rule table, tokens per tile, chat template, tiling as the layout's config says it)
LAYOUT_CASES: list[tuple[str, Callable[[Path], Path], str, str, int, str, dict]] = [
    ("native", _native, "native", "native", 16, "chatml", {"policy": "internvl_dynamic", "max_tiles": 6}),
    ("internvl_chat-qwen2", lambda r: write_internvl_chat(r, internlm2=False), "internvl_chat", "internvl_chat",
     16, "chatml", {"policy": "internvl_dynamic", "tile_size": 64, "max_tiles": 6, "use_thumbnail": True}),
    ("internvl_chat-internlm2-bf16",
     lambda r: write_internvl_chat(r, internlm2=True, qk_norm=True, max_dynamic_patch=9),
     "internvl_chat", "internvl_chat", 16, "chatml", {"policy": "internvl_dynamic", "max_tiles": 9}),
    ("llava-phi3-dense", write_llava_phi3_dense, "llava", "llava", 16, "phi3",
     {"policy": "anyres", "tile_size": 32, "max_tiles": 4,
      "grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32]]}),
    ("hf_internvl-bf16", _hf_internvl, "hf_internvl", "hf", 16, "chatml",
     {"policy": "internvl_dynamic", "tile_size": 64, "max_tiles": 12}),
    # a tied LM head is not stored; the layout points it at the embeddings, counted once
    ("hf_internvl-tied", lambda r: _hf_internvl(r, tie_word_embeddings=True), "hf_internvl", "hf", 16, "chatml",
     {"policy": "internvl_dynamic"}),
    ("hf_llava_onevision", _hf_onevision, "hf_llava_onevision", "hf", 16, "chatml",
     # pinpoints are stored [height, width]; fundusrt reports (width, height)
     {"policy": "anyres", "tile_size": 32, "max_tiles": 9,
      "grid_pinpoints": [[64, 32], [32, 64], [64, 64], [96, 64], [96, 96]]}),
]


@pytest.mark.parametrize(("writer", "layout", "rules", "tokens_per_tile", "template", "tiling"),
                         [pytest.param(*case[1:], id=case[0]) for case in LAYOUT_CASES])
def test_every_layout_is_described_from_its_headers(tmp_path, capsys, writer, layout, rules, tokens_per_tile,
                                                    template, tiling) -> None:
    root = writer(tmp_path / "ckpt")
    report = inspect_checkpoint(root)
    assert report.layout == layout
    assert report.ok, report.summary()
    headers = raw_headers(root)
    stored = expected_counts(root, DISK_COMPONENTS[rules])
    assert report.parameters == stored
    built = model_counts(root)
    assert report.expected_parameters == built
    # what the files hold beyond the model is exactly what the layout drops (SigLIP's unused pooling head)
    assert {k: stored[k] for k in ("vision", "connector", "language_model")} == {
        k: built[k] for k in ("vision", "connector", "language_model")}
    assert report.num_tensors == len(headers)
    assert report.files == sorted(p.name for p in root.glob("*.safetensors"))
    dtypes = sorted({dtype for _, dtype in headers.values()})
    assert sorted(report.dtypes) == dtypes and sum(report.dtypes.values()) == len(headers)
    assert {k: report.tiling[k] for k in tiling} == tiling
    assert report.image["tokens_per_tile"] == tokens_per_tile
    assert report.chat["template"] == template
    tokenizer = load(root).tokenizer
    assert report.chat["image_token"]["id"] == tokenizer.token_to_id(report.chat["image_token"]["token"])
    assert all(s["id"] == tokenizer.token_to_id(s["token"]) for s in report.chat["stop_tokens"])

    code, out, err = run_cli(capsys, str(root))
    assert code == 0 and not err
    assert f"layout      {layout}" in out and f"{len(report.files)} safetensors" in out
    assert f"total {stored['total']:,}" in out
    code, out, _ = run_cli(capsys, str(root), "--json")
    data = json.loads(out)
    assert code == 0 and data["ok"] is True and data["layout"] == layout
    assert data["parameters"] == stored and data["missing"] == data["unexpected"] == data["wrong_shape"] == []


def test_internlm2_bf16_header_dtypes_and_bos(tmp_path) -> None:
    root = write_internvl_chat(tmp_path / "ckpt", internlm2=True)
    report = inspect_checkpoint(root)
    assert report.dtypes == {"BF16": len(raw_headers(root))}
    assert report.chat["bos_token"] == {"token": "<s>", "id": load(root).tokenizer.token_to_id("<s>")}
    assert report.model["language_model"]["type"] == "llama"


@pytest.fixture
def qwen2_chat(tmp_path) -> Path:
    return write_internvl_chat(tmp_path / "ckpt", internlm2=False, seed=2)


def _rewrite_shards(root: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    """Apply `edit` to every shard's tensors in place (the index is left as it was)."""
    for file in sorted(root.glob("*.safetensors")):
        save_file(edit(load_file(str(file))), str(file), metadata={"format": "pt"})


def test_deleted_shard_is_named(qwen2_chat, capsys) -> None:
    (qwen2_chat / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"1 of 2 shards .* missing .*model-00002-of-00002\.safetensors"):
        inspect_checkpoint(qwen2_chat)
    code, out, err = run_cli(capsys, str(qwen2_chat))
    assert code == 1 and not out
    assert err.startswith("fundusrt inspect: ") and "model-00002-of-00002.safetensors" in err
    assert len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(capsys, str(qwen2_chat), "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and "model-00002-of-00002.safetensors" in data["error"]


def test_renamed_tensors_are_missing_and_unexpected_first_ten_listed(qwen2_chat, capsys) -> None:
    prefix = "language_model.model.layers.1."

    def rename(tensors):
        return {name.replace(prefix, "language_model.model.layers.7."): t for name, t in tensors.items()}

    _rewrite_shards(qwen2_chat, rename)
    moved = sorted(n for n in raw_headers(qwen2_chat) if n.startswith("language_model.model.layers.7."))
    assert len(moved) == 12
    report = inspect_checkpoint(qwen2_chat)
    assert not report.ok
    assert [p.name for p in report.missing] == sorted(n.replace(".layers.7.", ".layers.1.") for n in moved)
    assert [p.name for p in report.unexpected] == moved
    shapes = {name: shape for name, (shape, _) in raw_headers(qwen2_chat).items()}
    assert all(p.found == shapes[p.name] and p.file.startswith("model-0000") for p in report.unexpected)
    assert all(p.expected == shapes[p.name.replace(".layers.1.", ".layers.7.")] for p in report.missing)

    code, out, err = run_cli(capsys, str(qwen2_chat))
    assert code == 1 and "layout      internvl_chat" in out
    lines = err.splitlines()
    assert lines[0].endswith("does not match its config: 12 missing, 12 unexpected, 0 wrong-shape tensors")
    shown = [line for line in lines if line.startswith("  language_model.model.layers.")]
    assert len(shown) == 20, "the first 10 of each kind"
    assert "  ... and 2 more (--json lists all)" in lines
    code, out, _ = run_cli(capsys, str(qwen2_chat), "--json")
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and len(data["missing"]) == len(data["unexpected"]) == 12


def test_wrong_shapes_name_the_stored_tensor_file_and_both_shapes(qwen2_chat, capsys) -> None:
    fc1 = "vision_model.encoder.layers.1.mlp.fc1.weight"  # stored (64, 32)
    qkv = "vision_model.encoder.layers.0.attn.qkv.weight"  # stored (96, 32), split into q/k/v by the layout

    def reshape(tensors):
        if fc1 in tensors:
            tensors[fc1] = torch.zeros(48, 32)
        if qkv in tensors:
            tensors[qkv] = torch.zeros(99, 32)
        return tensors

    _rewrite_shards(qwen2_chat, reshape)
    report = inspect_checkpoint(qwen2_chat)
    wrong = {p.name: p for p in report.wrong_shape}
    assert sorted(wrong) == ["vision.encoder.layer.0.attention.k_proj.weight",
                             "vision.encoder.layer.0.attention.q_proj.weight",
                             "vision.encoder.layer.0.attention.v_proj.weight",
                             "vision.encoder.layer.1.mlp.fc1.weight"]
    fc1_problem = wrong["vision.encoder.layer.1.mlp.fc1.weight"]
    index = json.loads((qwen2_chat / "model.safetensors.index.json").read_text())["weight_map"]
    assert (fc1_problem.source, fc1_problem.file) == (fc1, index[fc1])
    assert (fc1_problem.found, fc1_problem.expected) == ([48, 32], [64, 32])
    q = wrong["vision.encoder.layer.0.attention.q_proj.weight"]
    assert (q.source, q.stored, q.found, q.expected) == (qkv, [99, 32], [33, 32], [32, 32])
    assert not report.missing and not report.unexpected

    code, _, err = run_cli(capsys, str(qwen2_chat))
    assert code == 1 and "0 missing, 0 unexpected, 4 wrong-shape tensors" in err
    assert (f"vision.encoder.layer.1.mlp.fc1.weight (stored as {fc1}) in {index[fc1]}: has (48, 32), "
            "config expects (64, 32)") in err
    assert (f"vision.encoder.layer.0.attention.q_proj.weight (stored as {qkv} (99, 32)) in {index[qkv]}: "
            "has (33, 32), config expects (32, 32)") in err


def test_unknown_config_lists_the_known_layouts(tmp_path, capsys) -> None:
    config = {"model_type": "mistral", "architectures": ["MistralForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        inspect_checkpoint(tmp_path)
    message = str(info.value)
    for layout in ("native", "internvl_chat", "llava", "hf_internvl", "hf_llava_onevision"):
        assert layout in message
    assert "model_type internvl_chat" in message and "mm_vision_tower" in message
    code, out, err = run_cli(capsys, str(tmp_path))
    assert code == 1 and not out and "holds no checkpoint layout fundusrt knows" in err
    code, out, _ = run_cli(capsys, str(tmp_path / "absent"), "--json")
    data = json.loads(out)
    assert code == 1 and data == {"ok": False, "path": str(tmp_path / "absent"), "error": data["error"]}
    assert "is not a directory" in data["error"]


def test_unsupported_llm_in_a_known_layout_says_what_is_supported(qwen2_chat) -> None:
    config = json.loads((qwen2_chat / "config.json").read_text())
    config["llm_config"]["architectures"] = ["MistralForCausalLM"]
    (qwen2_chat / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"cannot read the config .*'MistralForCausalLM' is not supported; "
                                              r"known: \['InternLM2ForCausalLM'"):
        inspect_checkpoint(qwen2_chat)


def test_corrupt_shard_is_named(qwen2_chat) -> None:
    shard = qwen2_chat / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(shard))} is not a valid safetensors file"):
        inspect_checkpoint(qwen2_chat)


def test_llava_tower_from_a_local_directory_is_listed(tmp_path) -> None:
    root = write_llava_phi3_dense(tmp_path / "ckpt", with_tower=False)
    tower = root / "siglip-tiny-patch8-32"
    with_tower = write_llava_phi3_dense(tmp_path / "full")
    prefix = "model.vision_tower.vision_tower."
    weights = {}
    for file in with_tower.glob("*.safetensors"):
        weights |= {k.removeprefix(prefix): v for k, v in load_file(str(file)).items() if k.startswith(prefix)}
    save_file(weights, str(tower / "model.safetensors"))
    report = inspect_checkpoint(root)
    assert report.ok, report.summary()
    assert report.files[-1] == "siglip-tiny-patch8-32/model.safetensors"
    assert report.parameters == expected_counts(with_tower, DISK_COMPONENTS["llava"])
    shutil.rmtree(tower)
    with pytest.raises(CheckpointError, match="mm_vision_tower 'siglip-tiny-patch8-32'"):
        inspect_checkpoint(root)

"""Decoders built by onnxruntime-genai (`fundusrt export --decoder fp32|int8|int4`).

References: the torch-exported package of the same checkpoint (the fp32 builder decoder must give its
greedy tokens and logits), separate runs (forks of the in-place KV buffer must answer as if alone),
and the accuracy gate against the fp32 package for the quantised decoders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from fundusrt.config import GenerationConfig
from fundusrt.manifest import PackageError
from fundusrt.runtime.pipeline import load_package
from tests._dicom_fixtures import fundus_picture

pytest.importorskip("onnxruntime_genai")

from fundusrt.export import export_package  # noqa: E402  (after the skip: needs the build side)
from fundusrt.export.genai import GenaiDecoderOptions  # noqa: E402

GEN = GenerationConfig(max_new_tokens=12)
QUESTIONS = ["Describe the image.", "Is there a haemorrhage?", "Which eye is this?"]


@pytest.fixture(scope="module")
def packages(tiny_package, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    checkpoint, torch_package = tiny_package("internvit-shuffle", seed=2)
    root = tmp_path_factory.mktemp("genai")
    built = {"torch": torch_package}
    for precision in ("fp32", "int4"):
        built[precision] = export_package(checkpoint, root / precision,
                                          genai_decoder=GenaiDecoderOptions(precision=precision))
    return built


def test_manifest_records_the_builder_and_the_in_place_cache(packages: dict[str, Path]) -> None:
    manifest = json.loads((packages["int4"] / "manifest.json").read_text())
    assert manifest["precision"] == "fp32+decoder-int4" and manifest["decoder"]["kv_cache"] == "shared"
    build = manifest["extra"]["decoder_build"]
    assert build["builder"].startswith("onnxruntime-genai") and build["block_size"] == 128
    graph = onnx.load(str(packages["int4"] / manifest["components"]["decoder"]["file"]), load_external_data=False)
    ops = {node.op_type for node in graph.graph.node}
    assert {"MatMulNBits", "GroupQueryAttention"} <= ops and "MatMul" not in ops
    nbits = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    # Only the last position reaches the LM head (the prefill projects one row onto the vocabulary, not all).
    logits = next(v for v in graph.graph.output if v.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1


def test_fp32_builder_decoder_answers_like_the_torch_export(packages: dict[str, Path]) -> None:
    reference, candidate = load_package(packages["torch"], threads=1), load_package(packages["fp32"], threads=1)
    image = fundus_picture(256, 256, seed=3)
    for question in QUESTIONS:
        want, got = reference.ask(image, question, GEN), candidate.ask(image, question, GEN)
        assert got.token_ids == want.token_ids, question
    # Logits after a prefill and several in-place decode steps, not only their argmax.
    encoded = reference.encode_image(image)
    _, embeds = reference.prompt_embeds(encoded, QUESTIONS[0])
    ref_dec, cand_dec = reference.sessions.decoder, candidate.sessions.decoder
    ref_dec.reset(), cand_dec.reset()
    diffs = [np.abs(ref_dec.prefill(embeds) - cand_dec.prefill(embeds)).max()]
    for token in (5, 17, 99, 3):
        diffs.append(np.abs(ref_dec.decode(token) - cand_dec.decode(token)).max())
    assert max(diffs) < 1e-3, diffs


def test_forks_of_the_in_place_cache_answer_like_separate_runs(packages: dict[str, Path]) -> None:
    pipe = load_package(packages["int4"], threads=1)
    image_a, image_b = fundus_picture(256, 256, seed=4), fundus_picture(256, 256, seed=5)
    together = pipe.ask_many(image_a, QUESTIONS, GEN)
    alone = [pipe.ask(image_a, q, GEN) for q in QUESTIONS]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    # Image B after image A: a stale buffer must not leak A's keys into B's answer. The reference is B
    # asked by a freshly opened package, whose buffers never held A.
    after_a = pipe.ask_many(image_b, QUESTIONS, GEN)
    fresh = load_package(packages["int4"], threads=1).ask_many(image_b, QUESTIONS, GEN)
    assert [a.token_ids for a in after_a] == [a.token_ids for a in fresh]
    first_logits = []
    for image in (image_a, image_b):
        _, embeds = pipe.prompt_embeds(pipe.encode_image(image), QUESTIONS[0])
        pipe.sessions.decoder.reset()
        first_logits.append(pipe.sessions.decoder.prefill(embeds))
    assert np.abs(first_logits[0] - first_logits[1]).max() > 1e-3  # the two images do differ


def test_a_corrupted_quantised_weight_is_refused(packages: dict[str, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(packages["int4"], tmp_path / "pkg"))
    data = copy / "decoder.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="decoder.onnx.data: sha256"):
        load_package(copy)


def test_interleaved_forks_do_not_write_into_each_other(packages: dict[str, Path]) -> None:
    pipe = load_package(packages["int4"], threads=1)
    _, embeds = pipe.prompt_embeds(pipe.encode_image(fundus_picture(256, 256, seed=6)), QUESTIONS[1])
    decoder = pipe.sessions.decoder
    decoder.reset()
    decoder.prefill(embeds)
    first, second = decoder.fork(), decoder.fork()
    first.decode(5)
    second.decode(9)  # writes the same position of its buffer: must not touch `first`'s
    interleaved = first.decode(7)
    decoder.reset()
    decoder.prefill(embeds)
    decoder.decode(5)
    assert np.array_equal(decoder.decode(7), interleaved)


@pytest.mark.slow
def test_int8_and_int4_demo_packages_pass_the_gate(tmp_path: Path) -> None:
    from fundusrt.calibration import CalibrationSettings, GateThresholds
    from fundusrt.calibration.package import GATE_KEY, gate_package

    demo = Path(__file__).resolve().parents[1] / "models" / "demo"
    reference = export_package(demo, tmp_path / "fp32", max_seq_len=512)
    settings = CalibrationSettings(holdout_images=4, holdout_studies=1, gate_tokens=16)
    for precision in ("int8", "int4"):
        package = export_package(demo, tmp_path / precision, max_seq_len=512,
                                 genai_decoder=GenaiDecoderOptions(precision=precision))
        report = gate_package(package, reference, settings=settings, threads=1)
        assert report.passed, (precision, report.failures)
        # the demo was never taught the MCQ prompt and does not declare it: the gate asks no MCQs
        assert report.figures["mcq"]["questions"] == 0 and report.figures["tokens"]["agreement"] == 1.0
        recorded = json.loads((package / "manifest.json").read_text())["extra"][GATE_KEY]
        assert recorded["passed"] and recorded["reference"]["precision"] == "fp32"
        load_package(package)  # the updated manifest still verifies
    # The gate can fail: no quantised decoder reproduces fp32 logits exactly.
    strict = gate_package(tmp_path / "int4", reference, settings=settings, threads=1,
                          thresholds=GateThresholds(decoder_cosine=1.0))
    assert not strict.passed and "decoder cosine" in strict.failures[0]
    assert json.loads((tmp_path / "int4" / "manifest.json").read_text())["extra"][GATE_KEY]["passed"] is False


@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_streamed_weights_equal_the_builders_own_save(precision: str, tiny_package, tmp_path: Path) -> None:
    """The reference: onnxruntime-genai's builder end to end (transformers checkpoint in, its own quantising
    save out). Our streamed save of the same decoder must write the same nodes and the same bytes."""
    import transformers
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    from fundusrt.export.genai import DECODER_FILE, build_genai_decoder
    from fundusrt.export.onnx import decoder_spec
    from fundusrt.models import load

    checkpoint, _ = tiny_package("internvit-shuffle", seed=3)
    model = load(checkpoint)
    hf, theirs = tmp_path / "hf", tmp_path / "theirs"
    model.language_model.save_pretrained(hf, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=model.tokenizer).save_pretrained(hf)
    extra = ["exclude_embeds=true", f"filename={DECODER_FILE}", "hf_token=false", "block_size=32",
             "accuracy_level=4", "is_symmetric=true"]
    parsed = parse_extra_options(None, str(hf), str(theirs), precision, "cpu", str(tmp_path / "cache"), extra)
    create_model(None, str(hf), str(theirs), precision, "cpu", str(tmp_path / "cache"), **parsed)
    ours = tmp_path / "ours"
    ours.mkdir()
    build_genai_decoder(model, ours, decoder_spec(model, 64), GenaiDecoderOptions(precision=precision, block_size=32))

    def graph(path: Path) -> tuple[list[tuple[str, str]], dict[str, np.ndarray]]:
        proto = onnx.load(str(path / DECODER_FILE))
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
        return sorted((n.op_type, n.name) for n in proto.graph.node), weights

    (their_nodes, their_weights), (our_nodes, our_weights) = graph(theirs), graph(ours)
    our_nodes = [node for node in our_nodes if node[1] != "/lm_head/last_position"]  # our Slice before the head
    assert our_nodes == their_nodes
    # Per layer: packed q/k/v, o, gate, up and down projections; then the LM head. No float MatMul is left.
    assert sum(op == "MatMulNBits" for op, _ in our_nodes) == 5 * model.config.text.num_layers + 1
    assert not any(op == "MatMul" for op, _ in our_nodes)
    our_weights = {k: v for k, v in our_weights.items() if not k.startswith("last_position/")}
    assert sorted(our_weights) == sorted(their_weights)
    for name, array in their_weights.items():
        np.testing.assert_array_equal(our_weights[name], array, err_msg=name)


def test_prepacked_weights_load_from_a_mapped_copy(packages: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Reference: the same package opened as it is (weights prepacked on the heap) gives the same logits."""
    from fundusrt.manifest import Manifest
    from fundusrt.runtime.backends import onnxruntime as backend

    monkeypatch.setenv("FUNDUSRT_CACHE", str(tmp_path / "cache"))
    manifest = Manifest.load(packages["int4"])
    embeds = np.random.default_rng(0).standard_normal((1, 5, manifest.decoder.hidden_size)).astype(np.float32)

    def run(min_bytes: int) -> tuple[str, list[np.ndarray]]:
        sessions = backend.open_package(packages["int4"], manifest, threads=1, providers=["CPUExecutionProvider"],
                                        prepacked_min_bytes=min_bytes)
        decoder = sessions.decoder
        logits = [decoder.prefill(embeds), decoder.decode(3), decoder.decode(7)]
        return decoder._session._model_path, logits

    source, expected = run(1 << 62)
    copy, got = run(0)
    assert Path(source).parent == packages["int4"] and Path(copy).parent.parent == tmp_path / "cache" / "ort-prepacked"
    np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=1e-5, atol=1e-5)
    copies = sorted((tmp_path / "cache" / "ort-prepacked").iterdir())
    assert len(copies) == len(manifest.components) and all((c / "complete").is_file() for c in copies)
    # the copy's data file holds the decoder's prepacked weights beside the original ones
    decoder_spec = manifest.components["decoder"]
    original = sum((packages["int4"] / f).stat().st_size for f in decoder_spec.data_files)
    assert (Path(copy).parent / "decoder.onnx.data").stat().st_size > original
    # a second open maps the same copies and writes nothing
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")}
    assert run(0)[0] == copy
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")} == before
    # a cache that cannot be written: a warning, and the package loads as it is
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    monkeypatch.setenv("FUNDUSRT_CACHE", str(blocked))
    with caplog.at_level("WARNING"):
        path, logits = run(0)
    assert path == source and "cannot write the prepacked copy" in caplog.text
    np.testing.assert_allclose(np.stack(logits), np.stack(expected), rtol=1e-6, atol=1e-6)


def test_phi3_longrope_builder_decoder_answers_like_the_torch_export(tmp_path: Path) -> None:
    """EyecareGPT-3.8B's decoder is Phi-3.5-mini: LongRoPE (131k positions over an original 4k), which the
    builder writes as its own model class with two rotary caches."""
    from tests._layout_fixtures import write_llava_phi3_dense

    checkpoint = write_llava_phi3_dense(tmp_path / "ckpt")
    config = json.loads((checkpoint / "config.json").read_text())
    half = config["hidden_size"] // config["num_attention_heads"] // 2
    config.update(max_position_embeddings=131072, original_max_position_embeddings=4096,
                  rope_scaling={"type": "longrope", "long_factor": np.linspace(1.0, 8.0, half).tolist(),
                                "short_factor": np.linspace(1.0, 1.5, half).tolist()})  # not 1: they must be applied
    (checkpoint / "config.json").write_text(json.dumps(config))
    torch_pkg = export_package(checkpoint, tmp_path / "torch", max_seq_len=1024)
    builder_pkg = export_package(checkpoint, tmp_path / "fp32", max_seq_len=1024,
                                 genai_decoder=GenaiDecoderOptions(precision="fp32"))
    reference, candidate = load_package(torch_pkg, threads=1), load_package(builder_pkg, threads=1)
    image = fundus_picture(256, 256, seed=3)
    for question in QUESTIONS:
        assert candidate.ask(image, question, GEN).token_ids == reference.ask(image, question, GEN).token_ids

"""INT8 calibration on a tiny package: real calibration set, Q/DQ form checked with onnx, gate behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fundusrt.calibration import (
    CalibrationError,
    CalibrationSettings,
    GateFailedError,
    GateThresholds,
    Prompt,
    QuantOptions,
    calibrate_package,
    load_prompts,
)
from fundusrt.calibration.gate import cosine
from fundusrt.kernels import patchify
from fundusrt.manifest import Manifest

onnx = pytest.importorskip("onnx")
pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

SETTINGS = CalibrationSettings(max_images=4, prompts_per_image=2, decode_steps=2, holdout_images=2,
                               holdout_studies=1, gate_tokens=8)
LENIENT = GateThresholds(vision_cosine=0.95, connector_cosine=0.95, decoder_cosine=0.9, mcq_agreement=0.5,
                         token_agreement=0.5)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fundusrt.export import export_package
    from fundusrt.models.tiny import write_tiny_checkpoint
    from fundusrt.synth import write_study

    root = tmp_path_factory.mktemp("calib")
    ckpt = write_tiny_checkpoint(root / "ckpt", family="siglip-dense", seed=0)
    # declares MCQs, so that the gate asks them (it skips them for packages that do not)
    package = export_package(ckpt, root / "fp32", max_seq_len=512, answers_mcq=True)
    write_study(root / "studies" / "s0", 3, size=(320, 256))
    holdout = root / "holdout"
    write_study(holdout, 4, size=(320, 256))
    return {"root": root, "fp32": Path(package), "studies": root / "studies", "holdout": holdout,
            "cache": root / "cache"}


@pytest.fixture(scope="module")
def int8(work: dict[str, Path]):
    return calibrate_package(work["fp32"], [work["studies"]], work["root"] / "int8", thresholds=LENIENT,
                             settings=SETTINGS, holdout=[work["holdout"]], cache_dir=work["cache"], threads=1)


def _initializers(model) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def test_qdq_form_is_symmetric_int8_per_channel_weights_per_tensor_activations(int8, work) -> None:
    manifest = Manifest.load(int8.package_dir)
    assert manifest.precision == "int8-qdq"
    for component in ("vision", "connector", "decoder"):
        model = onnx.load(str(int8.package_dir / manifest.components[component].file))
        inits = _initializers(model)
        quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
        dequant = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
        assert quant and dequant, f"{component} has no Q/DQ nodes"
        for node in quant + dequant:
            zero_point = inits.get(node.input[2]) if len(node.input) > 2 else None
            assert zero_point is None or (zero_point.dtype == np.int8 and not zero_point.any()), \
                f"{component} {node.name}: zero point {zero_point} is not int8 zero"
        # Weights: int8 initialisers dequantised with one scale per output channel.
        weights = [n for n in dequant if n.input[0] in inits and inits[n.input[0]].dtype == np.int8
                   and inits[n.input[0]].ndim == 2]
        assert weights, f"{component} has no int8 weights"
        for node in weights:
            assert inits[node.input[1]].shape == (inits[node.input[0]].shape[1],), f"{node.name}: not per-channel"
        # Activations: quantised at run time with a single scale.
        for node in quant:
            assert inits[node.input[1]].size == 1, f"{node.name}: activation scale is not per-tensor"
        # Attention's activation x activation MatMuls stay float.
        matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
        producers = {o: n.op_type for n in model.graph.node for o in n.output}
        float_matmuls = [n for n in matmuls if producers.get(n.input[1]) != "DequantizeLinear"]
        assert all(n.input[1] not in inits for n in float_matmuls)
    assert manifest.components["embed"].file == "embed.onnx"


def test_gate_figures_are_recorded_and_reproducible(int8, work) -> None:
    manifest = Manifest.load(int8.package_dir)
    manifest.verify(int8.package_dir)
    gate = manifest.extra["accuracy_gate"]
    assert gate["passed"] and not gate["forced"]
    assert gate["holdout"]["source"] == "user" and gate["holdout"]["images"] == 2
    assert gate["figures"]["mcq"]["questions"] == 2 * 4 and gate["figures"]["tokens"]["answers"] == 2 * 2
    # Recompute the worst vision cosine directly with ORT sessions on the held-out images.
    from fundusrt.calibration.dataset import iter_source_images, source_files

    fp32 = ort.InferenceSession(str(work["fp32"] / "vision.onnx"))
    quant = ort.InferenceSession(str(int8.package_dir / manifest.components["vision"].file))
    images = [i for i in iter_source_images(source_files([work["holdout"]])) if not isinstance(i, tuple)][:2]
    worst = 1.0
    for image in images:
        pixels = patchify(image.pixels, manifest.preprocessing).pixel_values
        a, b = fp32.run(None, {"pixel_values": pixels})[0].ravel(), quant.run(None, {"pixel_values": pixels})[0].ravel()
        worst = min(worst, float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert gate["figures"]["vision"]["cosine_min"] == pytest.approx(worst, abs=1e-5)
    quantisation = manifest.extra["quantization"]
    assert quantisation["method"] == "minmax" and quantisation["calibration"]["images"] == 4
    assert quantisation["calibration"]["decoder_samples"] == 4 * 2 * 3  # images x prompts x (prefill + 2 steps)


def test_int8_package_runs_on_ort_cpu(int8, work) -> None:
    from fundusrt.config import GenerationConfig
    from fundusrt.runtime.pipeline import load_package

    pipe = load_package(int8.package_dir, threads=1)
    report = pipe.run_study(work["holdout"], questions=["Describe the optic disc."],
                            gen=GenerationConfig(max_new_tokens=4))
    assert report.package["precision"] == "int8-qdq"
    assert report.images and all(len(im.answers) == 1 for im in report.images)


def test_rerun_reuses_the_cached_set_and_ranges(int8, work) -> None:
    again = calibrate_package(work["fp32"], [work["studies"]], work["root"] / "int8-again", thresholds=LENIENT,
                              settings=SETTINGS, holdout=[work["holdout"]], cache_dir=work["cache"], threads=1)
    assert again.cache_hit and not int8.cache_hit
    first, second = Manifest.load(int8.package_dir), Manifest.load(again.package_dir)
    for component in ("vision", "connector", "decoder"):
        assert first.components[component].sha256 == second.components[component].sha256
    assert sorted(p.name for p in int8.cache_dir.glob("*-ranges.json")) == [
        "connector-minmax-ranges.json", "decoder-minmax-ranges.json", "vision-minmax-ranges.json"]


def test_failing_gate_writes_nothing_unless_forced(int8, work) -> None:
    strict = GateThresholds(decoder_cosine=1.0)  # a quantised decoder never reproduces fp32 logits exactly
    out = work["root"] / "refused"
    with pytest.raises(GateFailedError, match="decoder cosine") as excinfo:
        calibrate_package(work["fp32"], [work["studies"]], out, thresholds=strict, settings=SETTINGS,
                          holdout=[work["holdout"]], cache_dir=work["cache"], threads=1)
    assert not out.exists()
    assert not [p for p in work["root"].iterdir() if p.name.startswith(".refused")]
    assert not excinfo.value.report.passed
    forced = calibrate_package(work["fp32"], [work["studies"]], out, thresholds=strict, settings=SETTINGS,
                               holdout=[work["holdout"]], cache_dir=work["cache"], force=True, threads=1)
    gate = json.loads((forced.package_dir / "manifest.json").read_text())["extra"]["accuracy_gate"]
    assert gate["passed"] is False and gate["forced"] is True and gate["failures"]


def test_weight_only_int4_decoder(int8, work) -> None:
    result = calibrate_package(work["fp32"], [work["studies"]], work["root"] / "w4", thresholds=LENIENT,
                               options=QuantOptions(decoder="int4-weight"), settings=SETTINGS,
                               holdout=[work["holdout"]], cache_dir=work["cache"], threads=1)
    manifest = Manifest.load(result.package_dir)
    assert manifest.precision == "int8-qdq+decoder-int4-weight"
    model = onnx.load(str(result.package_dir / manifest.components["decoder"].file))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # accuracy_level 4 (int8 dot products) is what makes weight-only decode fast on a CPU; without it ORT
    # dequantises every weight on every token.
    assert nbits and all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nbits)
    assert all({a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in nbits)
    assert manifest.extra["quantization"]["accuracy_level"] == 4


def test_int4_dq_decoder_is_standard_onnx_with_the_weights_it_dequantises(int8, work) -> None:
    """TensorRT's weight-only INT4 form. Reference: the fp32 decoder with each MatMul weight replaced by our
    own numpy dequantisation of the package's INT4 blocks must give the package's logits."""
    import onnxruntime as ort

    from fundusrt.export.tensorrt import check_precision

    result = calibrate_package(work["fp32"], [work["studies"]], work["root"] / "dq4", thresholds=LENIENT,
                               options=QuantOptions(decoder="int4-dq", block_size=32), settings=SETTINGS,
                               holdout=[work["holdout"]], cache_dir=work["cache"], threads=1)
    manifest = Manifest.load(result.package_dir)
    check_precision(manifest, "int8")  # TensorRT may build it (MatMulNBits would be refused)
    path = result.package_dir / manifest.components["decoder"].file
    model = onnx.load(str(path))
    assert {o.domain: o.version for o in model.opset_import}[""] >= 21
    assert not [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    inits = {t.name: t for t in model.graph.initializer}
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and inits[n.input[0]].data_type ==
          onnx.TensorProto.INT4]
    assert dq and all({a.name: a.i for a in n.attribute} == {"axis": 0, "block_size": 32} for n in dq)

    # Our reference dequantisation: w[k, n] = q[k, n] * scale[k // block, n], q signed 4-bit.
    reference = onnx.load(str(path))
    consumers = {n.output[0]: n for n in dq}
    for node in reference.graph.node:
        if node.op_type == "MatMul" and node.input[1] in consumers:
            q_name, s_name = consumers[node.input[1]].input[:2]
            q = onnx.numpy_helper.to_array(inits[q_name]).astype(np.float32)
            scales = onnx.numpy_helper.to_array(inits[s_name])
            weight = q * np.repeat(scales, 32, axis=0)[: q.shape[0]]
            name = f"{q_name}_reference"
            reference.graph.initializer.append(onnx.numpy_helper.from_array(weight.astype(np.float32), name))
            node.input[1] = name
    kept = [n for n in reference.graph.node if n not in dq]
    del reference.graph.node[:]
    reference.graph.node.extend(kept)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
        if value.name == "inputs_embeds":
            dims[1] = 3
            feeds[value.name] = np.random.default_rng(0).standard_normal(dims).astype(np.float32)
        elif value.name in ("attention_mask", "position_ids"):
            feeds[value.name] = (np.ones((1, 3), np.int64) if value.name == "attention_mask"
                                 else np.arange(3, dtype=np.int64)[None])
        else:  # empty past
            dims[2] = 0
            feeds[value.name] = np.zeros(dims, np.float32)
    # Basic optimisations only: at higher levels ORT fuses DQ + MatMul into MatMulNBits with int8 compute.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    ours = ort.InferenceSession(model.SerializeToString(), options).run(["logits"], feeds)[0]
    theirs = ort.InferenceSession(reference.SerializeToString(), options).run(["logits"], feeds)[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_entropy_and_percentile_handle_variable_length_decoder_feeds(int8, work, tmp_path: Path) -> None:
    from fundusrt.calibration.dataset import CalibrationSet
    from fundusrt.calibration.quantize import quantize_qdq

    manifest = Manifest.load(int8.package_dir)
    calib = CalibrationSet.load(int8.cache_dir, manifest.extra["quantization"]["calibration"]["key"])
    feeds = calib.feeds["decoder"]
    assert len({f["inputs_embeds"].shape[1] for f in feeds}) > 1
    for method in ("entropy", "percentile"):
        summary = quantize_qdq(work["fp32"] / "decoder.onnx", tmp_path / f"{method}.onnx", feeds,
                               QuantOptions(method=method))
        assert summary["ops"]["QuantizeLinear"] > 0
        session = ort.InferenceSession(str(tmp_path / f"{method}.onnx"))
        logits = session.run(["logits"], feeds[0])[0]
        reference = ort.InferenceSession(str(work["fp32"] / "decoder.onnx")).run(["logits"], feeds[0])[0]
        assert cosine(logits, reference) > 0.9


def test_bad_inputs_have_clear_errors(work, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    with pytest.raises(CalibrationError, match="no usable fundus image"):
        calibrate_package(work["fp32"], [empty], tmp_path / "out", settings=SETTINGS, cache_dir=tmp_path / "c")
    assert not (tmp_path / "out").exists()
    with pytest.raises(CalibrationError, match="also calibration files"):
        calibrate_package(work["fp32"], [work["studies"]], tmp_path / "out", settings=SETTINGS,
                          holdout=[work["studies"]], cache_dir=work["cache"])
    with pytest.raises(CalibrationError, match="does not exist"):
        calibrate_package(work["fp32"], [tmp_path / "missing"], tmp_path / "out", cache_dir=tmp_path / "c")
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        QuantOptions(method="kl")
    with pytest.raises(CalibrationError, match="calibrate the fp32 export"):
        calibrate_package(work["root"] / "int8", [work["studies"]], tmp_path / "out2", cache_dir=tmp_path / "c")


def test_prompts_file_forms(tmp_path: Path) -> None:
    text = tmp_path / "q.txt"
    text.write_text("Describe the disc.\n\nAny haemorrhages?\n")
    assert load_prompts(text, []) == [Prompt("Describe the disc."), Prompt("Any haemorrhages?")]
    data = tmp_path / "q.json"
    data.write_text(json.dumps(["Open?", {"question": "Which eye?", "options": ["Right", "Left"]}]))
    prompts = load_prompts(data, [])
    assert prompts[1].letters == "AB"
    assert prompts[1].text().splitlines()[:3] == ["Which eye?", "A. Right", "B. Left"]
    data.write_text(json.dumps([{"options": ["x"]}]))
    with pytest.raises(CalibrationError, match="item 0"):
        load_prompts(data, [])
    defaults = load_prompts(None, ["Describe."])
    assert defaults[0] == Prompt("Describe.") and any(p.options for p in defaults)


def test_cosine_matches_the_formula() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((3, 5)), rng.standard_normal((3, 5))
    expected = float(np.sum(a * b) / np.sqrt(np.sum(a * a) * np.sum(b * b)))
    assert cosine(a.astype(np.float32), b.astype(np.float32)) == pytest.approx(expected, rel=1e-6)
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), np.ones(3)) == 0.0


def test_builder_decoder_package_gets_int8_vision_and_keeps_its_decoder(work, tmp_path: Path) -> None:
    """A package whose decoder onnxruntime-genai's builder already quantised: vision and connector are calibrated,
    the decoder file is kept byte for byte, and the gate judges the whole package against its source."""
    pytest.importorskip("onnxruntime_genai")
    from fundusrt.export import export_package
    from fundusrt.export.genai import GenaiDecoderOptions

    source = Path(export_package(work["root"] / "ckpt", tmp_path / "int4", max_seq_len=512,
                                 genai_decoder=GenaiDecoderOptions(precision="int4")))
    with pytest.raises(CalibrationError, match="pass --decoder fp32"):
        calibrate_package(source, [work["studies"]], tmp_path / "refused", settings=SETTINGS,
                          holdout=[work["holdout"]], cache_dir=tmp_path / "cache", threads=1)
    result = calibrate_package(source, [work["studies"]], tmp_path / "out", thresholds=LENIENT,
                               options=QuantOptions(decoder="fp32"), settings=SETTINGS, holdout=[work["holdout"]],
                               cache_dir=tmp_path / "cache", threads=1)
    before, after = Manifest.load(source), Manifest.load(result.package_dir)
    assert after.precision == "int8-qdq+decoder-int4"
    assert after.components["decoder"] == before.components["decoder"]
    for component in ("vision", "connector"):
        model = onnx.load(str(result.package_dir / after.components[component].file))
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node), component
    quantisation = after.extra["quantization"]
    assert quantisation["components"]["decoder"] == {"mode": "fp32"}
    assert quantisation["calibration"]["decoder_samples"] == 0
    gate = after.extra["accuracy_gate"]
    assert gate["passed"] and gate["figures"]["tokens"]["answers"] > 0

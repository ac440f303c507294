"""TensorRT engine builder and backend: what runs without TensorRT, plus hardware tests that skip without it.

TensorRT cannot be installed on the CI machines, so nothing here imitates it: the profile
computation is checked against the package's own ONNX (ONNX Runtime runs every min/opt/max shape),
and the version/GPU/sha256 checks run on recorded metadata. The engine tests need tensorrt,
cuda-python and a GPU and skip with the reason otherwise.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fundusrt._deps import MissingDependencyError, available
from fundusrt.manifest import Manifest, PackageError, sha256_file
from fundusrt.runtime.backends.base import BACKENDS, BackendError, unavailable_reason
from fundusrt.runtime.backends.trt_engines import (
    TRT_KEY,
    EngineTarget,
    compatibility_problem,
    engine_record,
    verify_engines,
)

import onnxruntime as ort

HAS_TRT = available("tensorrt") and available("cuda.bindings.driver")


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")  # exporting the package needs it; the tests without `package` do not
    from fundusrt.export import export_package
    from fundusrt.models.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("trt")
    ckpt = write_tiny_checkpoint(root / "ckpt", family="internvit-shuffle", seed=0)
    return Path(export_package(ckpt, root / "pkg", max_seq_len=256))


def test_profiles_cover_tiles_and_phases(package: Path) -> None:
    from fundusrt.runtime.backends.profiles import max_image_tiles, plan_profiles

    manifest = Manifest.load(package)
    profiles = plan_profiles(manifest, opt_tiles=2)
    most = manifest.preprocessing.max_tiles + 1  # internvit-shuffle uses a thumbnail
    assert max_image_tiles(manifest) == most
    (vision,) = profiles["vision"]
    low, opt, high = vision.shapes["pixel_values"]
    size = manifest.preprocessing.tile_size
    assert (low, opt, high) == ((1, 3, size, size), (2, 3, size, size), (most, 3, size, size))
    prefill, decode = profiles["decoder"]
    assert (prefill.name, decode.name) == ("prefill", "decode")
    max_seq, layers = manifest.decoder.max_seq_len, manifest.decoder.num_layers
    for profile in (prefill, decode):
        assert set(profile.shapes) == {t.name for t in manifest.components["decoder"].inputs}
        assert len([n for n in profile.shapes if n.startswith("past_key_values")]) == 2 * layers
        for name, (lo, op, hi) in profile.shapes.items():
            assert all(a <= b <= c for a, b, c in zip(lo, op, hi, strict=True)), name
        for i in range(2):  # mask length = past + new tokens at min and opt; max is capped by max_seq_len
            assert profile.shapes["attention_mask"][i][1] == (
                profile.shapes["past_key_values.0.key"][i][2] + profile.shapes["inputs_embeds"][i][1])
        assert profile.shapes["attention_mask"][2][1] == max_seq
    assert decode.shapes["inputs_embeds"][2][1] == 1 and prefill.shapes["inputs_embeds"][2][1] == max_seq
    assert decode.shapes["past_key_values.0.key"][2][2] == max_seq - 1


def _feed(shapes: dict[str, tuple[int, ...]], session) -> dict[str, np.ndarray]:
    types = {i.name: i.type for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    feed = {}
    for name, shape in shapes.items():
        if types[name] == "tensor(int64)":
            feed[name] = (np.ones(shape, np.int64) if name == "attention_mask"
                          else np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape) % 100)
        else:
            feed[name] = rng.standard_normal(shape).astype(np.float32)
    return feed


def test_every_profile_shape_runs_on_the_onnx_model(package: Path) -> None:
    """The profiles are shapes the exported graphs accept: ONNX Runtime runs each min/opt/max point."""
    from fundusrt.runtime.backends.profiles import plan_profiles

    manifest = Manifest.load(package)
    for component, profiles in plan_profiles(manifest, opt_prompt=40).items():
        session = ort.InferenceSession(str(package / manifest.components[component].file))
        for profile in profiles:
            for point in range(3):
                if component == "decoder" and point == 2 and profile.name == "prefill":
                    continue  # a full-length prompt over a full cache is past max_seq_len by design
                shapes = {name: s[point] for name, s in profile.shapes.items()}
                outputs = session.run(None, _feed(shapes, session))
                assert all(np.isfinite(o).all() for o in outputs), f"{component}/{profile.name}/{point}"


def test_profiles_reject_bad_settings_and_unknown_axes(package: Path) -> None:
    from fundusrt.runtime.backends.profiles import plan_profiles

    manifest = Manifest.load(package)
    with pytest.raises(PackageError, match="opt_tiles"):
        plan_profiles(manifest, opt_tiles=99)
    with pytest.raises(PackageError, match="opt_prompt"):
        plan_profiles(manifest, opt_prompt=0)
    vision = manifest.components["vision"]
    renamed = dataclasses.replace(vision.inputs[0], shape=["frames", 3, 64, 64])
    manifest.components["vision"] = dataclasses.replace(vision, inputs=[renamed])
    with pytest.raises(PackageError, match="dynamic axis 'frames'"):
        plan_profiles(manifest)


def test_ort_trt_gets_one_covering_profile_per_component(package: Path, monkeypatch: pytest.MonkeyPatch,
                                                          tmp_path: Path) -> None:
    """ort-trt passes the TensorRT EP explicit ranges covering prefill and decode, so it never rebuilds mid-run."""
    from fundusrt.runtime.backends.base import BACKENDS
    from fundusrt.runtime.backends.profiles import covering_profile, plan_profiles, with_trt_profiles

    monkeypatch.setenv("FUNDUSRT_CACHE", str(tmp_path))
    manifest = Manifest.load(package)
    prefill, decode = plan_profiles(manifest)["decoder"]
    cover = covering_profile([prefill, decode])
    for name, (low, opt, high) in cover.shapes.items():
        assert low == tuple(map(min, prefill.shapes[name][0], decode.shapes[name][0]))
        assert high == tuple(map(max, prefill.shapes[name][2], decode.shapes[name][2]))
        assert opt == decode.shapes[name][1]
    providers = BACKENDS["ort-trt"].options["providers"]
    for component in manifest.components:
        given = with_trt_profiles(providers, manifest, component)
        assert given[1:] == providers[1:]
        name, options = given[0]
        assert name == "TensorrtExecutionProvider"
        assert options["trt_engine_cache_path"] == str(tmp_path / "ort-trt")
        expected = covering_profile(plan_profiles(manifest)[component])
        for point, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
            parsed = dict(item.split(":") for item in options[key].split(","))
            assert parsed == {n: "x".join(map(str, s[point])) for n, s in expected.shapes.items()}, key
    cpu = BACKENDS["ort-cpu"].options["providers"]
    assert with_trt_profiles(cpu, manifest, "decoder") == cpu


def test_precision_rules(package: Path) -> None:
    from fundusrt.export.tensorrt import check_precision

    manifest = Manifest.load(package)
    check_precision(manifest, "fp16")
    with pytest.raises(PackageError, match="fundusrt calibrate"):
        check_precision(manifest, "int8")
    manifest.precision = "int8-qdq+decoder-int4-weight"
    manifest.extra["quantization"] = {"components": {"vision": {"mode": "qdq"}, "decoder": {"mode": "int4-weight"}}}
    with pytest.raises(PackageError, match="MatMulNBits"):
        check_precision(manifest, "int8")
    with pytest.raises(PackageError, match="fp32 package"):
        check_precision(manifest, "fp16")


BUILT = EngineTarget("10.3.0", "Orin", "8.7")


def _record(tmp_path: Path) -> dict:
    engines = {}
    for component in ("vision", "connector", "embed", "decoder"):
        path = tmp_path / f"{component}.int8.engine"
        path.write_bytes(f"engine bytes of {component}".encode())
        engines[component] = {"file": path.name, "sha256": sha256_file(path), "profiles": []}
    return {"precision": "int8", **dataclasses.asdict(BUILT), "engines": engines}


def test_version_and_gpu_mismatch_messages_say_how_to_rebuild(tmp_path: Path) -> None:
    record = _record(tmp_path)
    assert compatibility_problem(record, BUILT, tmp_path) is None
    message = compatibility_problem(record, EngineTarget("10.7.0", "Orin", "8.7"), tmp_path)
    assert "TensorRT 10.3.0 != 10.7.0" in message and f"fundusrt build-engines {tmp_path} --int8" in message
    message = compatibility_problem(record, EngineTarget("10.3.0", "NVIDIA H100 80GB HBM3", "9.0"), tmp_path)
    assert "compute capability 8.7 != 9.0" in message and "'Orin'" in message and "rebuild" in message


def test_tampered_or_missing_engine_fails_sha256(tmp_path: Path) -> None:
    record = _record(tmp_path)
    verify_engines(record, tmp_path)
    (tmp_path / "decoder.int8.engine").write_bytes(b"engine bytes of decoder, patched")
    (tmp_path / "vision.int8.engine").unlink()
    with pytest.raises(PackageError, match="decoder.int8.engine \\(decoder\\): sha256") as excinfo:
        verify_engines(record, tmp_path)
    assert "vision.int8.engine (vision): missing" in str(excinfo.value)


def test_package_without_engines_says_how_to_build(package: Path) -> None:
    manifest = Manifest.load(package)
    with pytest.raises(PackageError, match="fundusrt build-engines"):
        engine_record(manifest, package)
    manifest.extra[TRT_KEY] = {"precision": "fp16", "engines": {"vision": {}}}
    with pytest.raises(PackageError, match="no engines for"):
        engine_record(manifest, package)


def test_backend_is_registered_and_explains_what_is_missing(package: Path) -> None:
    assert BACKENDS["trt"].module == "fundusrt.runtime.backends.tensorrt"
    assert BACKENDS["trt-graph"].options == {"cuda_graph": True}
    reason = unavailable_reason("trt")
    if HAS_TRT:
        pytest.skip("tensorrt is installed here; the missing-dependency message does not apply")
    assert "fundusrt[gpu-cu12]" in reason and "fundusrt[jetson]" in reason
    from fundusrt.runtime.pipeline import load_package

    with pytest.raises(BackendError, match="fundusrt\\[jetson\\]"):
        load_package(package, backend="trt")


@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed here")
def test_build_engines_without_tensorrt_names_the_extra(package: Path) -> None:
    from fundusrt.export.tensorrt import build_engines

    with pytest.raises(MissingDependencyError, match="fundusrt\\[gpu-cu13\\]"):
        build_engines(package, "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="needs tensorrt, cuda-python and a GPU (`fundusrt doctor` names the install profile)")
def test_fp16_engines_match_onnxruntime(package: Path, tmp_path: Path) -> None:
    import shutil

    from fundusrt.export.tensorrt import build_engines
    from fundusrt.runtime.pipeline import load_package

    pkg = Path(shutil.copytree(package, tmp_path / "pkg"))
    record = build_engines(pkg, "fp16", workspace_mib=512, timing_cache=tmp_path / "timing.cache")
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert Manifest.load(pkg).extra[TRT_KEY]["engines"]["decoder"]["sha256"] == record["engines"]["decoder"]["sha256"]
    image = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    reference = load_package(pkg, backend="ort-cpu")
    for backend in ("trt", "trt-graph"):
        pipe = load_package(pkg, backend=backend)
        encoded, expected = pipe.encode_image(image), reference.encode_image(image)
        diff = float(np.abs(encoded.image_embeds - expected.image_embeds).max())
        assert diff < 5e-2, f"{backend} image embeddings max abs diff {diff:.3g}"
        _, embeds = reference.prompt_embeds(expected, "Describe the disc.")
        for session in (pipe.sessions.decoder, reference.sessions.decoder):
            session.reset()
        logits = [s.prefill(embeds) for s in (pipe.sessions.decoder, reference.sessions.decoder)]
        for _ in range(4):
            token = int(np.argmax(logits[1]))
            logits = [s.decode(token) for s in (pipe.sessions.decoder, reference.sessions.decoder)]
            diff = float(np.abs(logits[0] - logits[1]).max())
            assert diff < 0.1, f"{backend} decode logits max abs diff {diff:.3g}"

"""scripts/gpu-check and the CUDA patching benchmark: what can be checked on a machine without a GPU.

The mini step runs here at its tiny size (the mini's 448 px tile and 151,674-token vocabulary, 2-layer
towers) with ORT CPU on both sides: the checkpoint writer, `fundusrt export`, the saved CPU reference and
the comparison are the ones the GPU run uses; only the second backend differs. scripts/gpu-wheels' stable-ABI
build of the resampler (what an uninstalled checkout uses on another Python) is built and compared with Pillow.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundusrt.doctor import read_cuda_driver
from fundusrt.runtime.backends.base import unavailable_reason

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_a_gpu_says_so_and_writes_its_report(tmp_path: Path) -> None:
    driver = read_cuda_driver()
    if driver is not None and driver.devices:
        pytest.skip("this machine has a GPU: run scripts/gpu-check itself")
    out = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu-check"), "--out", str(out), "--work",
                           str(tmp_path / "work")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "gpu-check needs an NVIDIA GPU" in proc.stderr and "Traceback" not in proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] is False and "nothing was run" in report["error"]
    assert report["machine"]["CUDA driver"]["status"] != "ok" and "steps" not in report


def test_cuda_patching_benchmark_starts() -> None:
    """The benchmark's imports and arguments resolve (it once imported a name that did not exist)."""
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/bench_cuda_patchify.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--json" in proc.stdout


def _step(step: str, work: Path, out: Path, *extra: str) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/gpu-check"), "--step", step, "--size", "tiny",
                           "--work", str(work), "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_mini_step_on_the_cpu_builds_once_and_compares(tmp_path: Path) -> None:
    work = tmp_path / "work"
    cpu = _step("mini-cpu", work, tmp_path / "cpu.json")
    assert cpu["ok"], cpu
    build = cpu["build"]
    assert "reused" not in build and build["export_s"] > 0 and build["package_gib"] > 0
    manifest = json.loads((work / "mini-tiny" / "package" / "manifest.json").read_text())
    # the real InternVL chat layout, exported in fp16 with the mini's vocabulary and one 256-token tile
    assert manifest["source"]["layout"] == "internvl_chat" and manifest["precision"] == "fp16"
    assert manifest["decoder"]["vocab_size"] == 151674 and manifest["preprocessing"]["max_tiles"] == 1

    report = _step("mini", work, tmp_path / "mini.json", "--against", "ort-cpu")
    assert report["ok"], report
    assert report["build"]["reused"] is True
    assert report["reference"] == cpu["reference"]  # the saved CPU run, read back rather than run again
    assert report["token_parity"] and report["questions_identical"] == 1
    assert report["first_token_logits_max_abs_diff"] == 0.0
    assert report["first_token_logits_cosine"] == pytest.approx(1.0)
    reference, compared = report["reference"], report["compared"]
    assert reference["tokens"] == compared["tokens"] and 1 <= len(reference["tokens"]) <= 16
    assert report["reference_distinct_tokens"] == len(set(reference["tokens"]))
    assert report["reference_first_token_margin"] >= 0
    for figures in (reference, compared):
        assert figures["backend"] == "ort-cpu" and figures["prompt_tokens"] > 256
        assert 0 < figures["vision_ms_per_tile"] < figures["ttft_ms"]
        assert figures["decode_steps"] in (len(reference["tokens"]) - 1, len(reference["tokens"]))
        assert figures["decode_steps"] == 0 or figures["decode_tok_s"] > 0


@pytest.mark.parametrize(("step", "backend"), [("ort-cuda", "ort-cuda"), ("mini", "ort-cuda"), ("tensorrt", "trt")])
def test_a_step_this_machine_cannot_run_says_why_and_builds_nothing(tmp_path: Path, step: str, backend: str) -> None:
    """A CPU build of onnxruntime (no CUDA provider) and no tensorrt: the step is skipped with the backend's own
    reason (what to install), not run and failed; a full run lists it under `skipped`, outside `ok`."""
    reason = unavailable_reason(backend)
    if reason is None:
        pytest.skip(f"{backend} can run here: the full scripts/gpu-check covers the {step} step")
    work = tmp_path / "work"
    report = _step(step, work, tmp_path / f"{step}.json")
    assert report == {"ok": False, "skipped": reason}
    assert list(work.iterdir()) == []  # no demo or mini package was exported for it


def _script_module(name: str):
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), str(ROOT / "scripts" / name))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


def test_gpu_wheels_resampler_on_the_stable_abi_is_pillow_exact(tmp_path: Path, monkeypatch) -> None:
    """The abi3 build loads on any CPython >= 3.11 (the checkout's own build only on this one): the C source
    must stay within the limited API, and the build keeps pyproject's flags (Pillow-exact output)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (scripts/setup installs build-essential)")
    tomllib = pytest.importorskip("tomllib", reason="scripts/gpu-wheels needs Python 3.11+")
    wheels = _script_module("gpu-wheels")
    built = wheels.build_resampler(tomllib.loads((ROOT / "pyproject.toml").read_text()), tmp_path)
    assert built.name == "_resample.abi3.so"
    spec = importlib.util.spec_from_file_location("_resample", built)
    abi3 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(abi3)

    from fundusrt.kernels import resample

    monkeypatch.setattr(resample, "_resample", abi3)  # resize_bicubic's RGB and RGBX paths on the abi3 build
    rng = np.random.default_rng(0)
    for (w, h), size in [((640, 480), (448, 448)), ((300, 900), (448, 160)), ((97, 53), (224, 224))]:
        rgbx = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
        image = np.ascontiguousarray(rgbx[..., :3])
        expected = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        np.testing.assert_array_equal(resample.resize_bicubic(image, size), expected)
        np.testing.assert_array_equal(resample.resize_bicubic(rgbx[..., :3], size), expected)

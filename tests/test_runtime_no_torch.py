"""The runtime runs a DICOM study end to end with torch and transformers unimportable (as on a Jetson), and
every CLI verb's --help and missing-dependency message work there. The synthetic generator is blocked
too: screening reads its questions and codes from the protocol file, never from `fundusrt.synth`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fundusrt.cli import VERBS

BLOCKED = ("torch", "transformers", "fundusrt.models", "fundusrt.export", "fundusrt.calibration",
           "fundusrt.training", "fundusrt.synth")

# Runs in a fresh interpreter: a meta-path finder refuses the build-side modules before anything is imported.
CHILD = textwrap.dedent("""
    import importlib.abc, json, sys

    BLOCKED = {blocked!r}

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{{name}} is blocked: the runtime must not import it")
            return None

    sys.meta_path.insert(0, Refuse())
    from fundusrt.cli import main
    import fundusrt

    code = main(["run", {study!r}, "--package", {package!r}, "--json", {json_out!r}, "--max-new-tokens", "6",
                 "--threads", "1", "--question", "Is the optic disc normal?", "--dicom-out", {dicom_out!r}])
    pipe = fundusrt.load_package({package!r}, threads=1)
    assert type(pipe).__name__ == "Pipeline"
    loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    print(json.dumps({{"code": code, "loaded": loaded}}))
""")


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    pytest.importorskip("torch")  # only to build the package in this (parent) process
    return tiny_package("internvit-shuffle", seed=1)[1]


@pytest.mark.slow  # exports a package (~30 s on 2 cores)
def test_fundusrt_run_without_torch(package: Path, tmp_path: Path) -> None:
    from fundusrt.synth import write_study

    study = write_study(tmp_path / "study", seed=3, size=(320, 256)).out_dir
    json_out = tmp_path / "report.json"
    script = CHILD.format(blocked=BLOCKED, study=str(study), package=str(package), json_out=str(json_out),
                          dicom_out=str(tmp_path / "results"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}, proc.stderr
    assert "Is the optic disc normal?" in proc.stdout  # the text report went to stdout
    report = json.loads(json_out.read_text())
    assert report["images"] and all(len(i["answers"]) == 1 for i in report["images"])
    assert report["package"]["name"] and set(report["eyes"]) <= {"R", "L", "unknown"}
    assert report["screening"]["decision"] in ("refer", "no_refer", "ungradable")
    assert len(list((tmp_path / "results").glob("SR_*.dcm"))) == 1


def test_blocker_really_blocks() -> None:
    """The finder must make torch unimportable, or the test above would prove nothing."""
    script = CHILD.split("sys.meta_path.insert(0, Refuse())")[0].format(blocked=BLOCKED) + textwrap.dedent("""
        sys.meta_path.insert(0, Refuse())
        try:
            import torch
        except ImportError as exc:
            print("blocked:", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "blocked: torch is blocked" in proc.stdout, proc.stderr


# Every verb's --help, then the verbs that need what a device lacks, each run to its missing-dependency message.
CLI_CHILD = textwrap.dedent("""
    import contextlib, importlib.abc, io, json, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in ("torch", "transformers")):
                raise ImportError(f"{{name}} is blocked: a runtime-only install has no torch")
            return None

    sys.meta_path.insert(0, Refuse())
    from fundusrt.cli import main

    def call(argv):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exc:
                code = exc.code
            except BaseException as exc:
                code = f"raised {{type(exc).__name__}}: {{exc}}"
        return {{"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}}

    results = {{verb: call([verb, "--help"]) for verb in {verbs!r}}}
    results.update({{" ".join(argv): call(argv) for argv in {runs!r}}})
    print(json.dumps(results))
""")

# verb invocations that must stop at require() with the extra to install (the paths need not exist)
NEEDS_MISSING = {
    ("inspect", "ckpt"): "fundusrt[export]",
    ("export", "ckpt", "--out", "pkg"): "fundusrt[export]",
    ("build-engines", "pkg", "--fp16"): "fundusrt[gpu-cu12]",
}


def test_every_verb_helps_and_names_its_extra_without_torch() -> None:
    from fundusrt._deps import available

    runs = [list(argv) for argv in NEEDS_MISSING if argv[0] != "build-engines" or not available("tensorrt")]
    script = CLI_CHILD.format(verbs=sorted(VERBS), runs=runs)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for verb in VERBS:
        got = results[verb]
        assert got["code"] == 0 and f"usage: fundusrt {verb}" in got["stdout"], f"{verb} --help: {got}"
    for argv, extra in NEEDS_MISSING.items():
        if " ".join(argv) not in results:
            continue
        got = results[" ".join(argv)]
        assert got["code"] == 1, f"{argv}: {got}"
        assert extra in got["stderr"] and "Traceback" not in got["stderr"], f"{argv}: {got['stderr']}"


def test_doctor_runs_without_torch(tmp_path: Path) -> None:
    """`fundusrt doctor` is what a device runs first: it must work on a runtime-only install."""
    script = CHILD.split("sys.meta_path.insert(0, Refuse())")[0].format(blocked=BLOCKED) + textwrap.dedent("""
        sys.meta_path.insert(0, Refuse())
        from fundusrt.cli import main
        code = main(["doctor", "--json"])
        print(json.dumps({"code": code}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    *report, last = proc.stdout.strip().splitlines()
    checks = {c["name"]: c for c in json.loads("\n".join(report))}
    assert json.loads(last)["code"] in (0, 1)
    assert {"CPU", "CUDA driver", "onnxruntime", "cuda-python", "NVRTC", "TensorRT", "backends", "profile"} <= set(checks)
    assert "ort-cpu" in checks["backends"]["detail"]


# Test modules whose references come from transformers for some tests only: on a runtime-only install the
# others must still run (a module-level importorskip would skip them all).
RUNTIME_TEST_MODULES = ("test_sampling.py", "test_tiling.py", "test_patchify.py", "test_tensorrt.py")
PYTEST_WITHOUT_TORCH = textwrap.dedent("""
    import importlib.abc, sys

    class Absent(importlib.abc.MetaPathFinder):  # as if never installed: importorskip skips on this error
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "transformers"):
                raise ModuleNotFoundError(f"No module named {name!r}")
            return None

    sys.meta_path.insert(0, Absent())
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
""")


@pytest.mark.parametrize("module", RUNTIME_TEST_MODULES)
def test_runtime_tests_run_on_a_runtime_only_install(module: str) -> None:
    path = Path(__file__).parent / module
    proc = subprocess.run([sys.executable, "-c", PYTEST_WITHOUT_TORCH, str(path)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).parents[1])
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0 and " passed" in summary and "error" not in summary, proc.stdout[-2000:]

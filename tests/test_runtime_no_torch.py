"""The runtime runs a DICOM study end to end with torch and transformers unimportable (as on a Jetson)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("torch")  # only to build the package in this (parent) process

pytestmark = pytest.mark.slow  # exports a package (~30 s on 2 cores)

BLOCKED = ("torch", "transformers", "fundusrt.models", "fundusrt.export", "fundusrt.calibration",
           "fundusrt.training")

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
                 "--threads", "1", "--question", "Is the optic disc normal?"])
    pipe = fundusrt.load_package({package!r}, threads=1)
    assert type(pipe).__name__ == "Pipeline"
    loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in BLOCKED))
    print(json.dumps({{"code": code, "loaded": loaded}}))
""")


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package("internvit-shuffle", seed=1)[1]


def test_fundusrt_run_without_torch(package: Path, tmp_path: Path) -> None:
    from fundusrt.synth import write_study

    study = write_study(tmp_path / "study", seed=3, size=(320, 256)).out_dir
    json_out = tmp_path / "report.json"
    script = CHILD.format(blocked=BLOCKED, study=str(study), package=str(package), json_out=str(json_out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0, "loaded": []}, proc.stderr
    assert "Is the optic disc normal?" in proc.stdout  # the text report went to stdout
    report = json.loads(json_out.read_text())
    assert report["images"] and all(len(i["answers"]) == 1 for i in report["images"])
    assert report["package"]["name"] and set(report["eyes"]) <= {"R", "L", "unknown"}


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

"""scripts/gpu-check and the CUDA patching benchmark: what can be checked on a machine without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fundusrt.doctor import read_cuda_driver

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

"""`fundusrt doctor`: the parts that decide what to recommend, on the file formats a Jetson really has."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fundusrt import doctor
from fundusrt.doctor import CudaDriver, JetsonInfo, parse_l4t_release, read_jetson, recommended_profile

# /etc/nv_tegra_release as JetPack 6.2 (L4T 36.4.3) writes it
NV_TEGRA_RELEASE = "# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64, DATE: Wed Jan  8 01:49:37 UTC 2025\n# KERNEL_VARIANT: oot\n"


def test_l4t_release_and_jetpack_line() -> None:
    assert parse_l4t_release(NV_TEGRA_RELEASE) == (36, 4, 3)
    assert parse_l4t_release("# R35 (release), REVISION: 5.0, GCID: 1") == (35, 5, 0)
    assert parse_l4t_release("# R36 (release), REVISION: 4") == (36, 4, 0)
    assert parse_l4t_release("not a release file") is None
    assert "TensorRT 10.3" in doctor.jetpack_for((36, 4, 3))
    assert "TensorRT 8.6" in doctor.jetpack_for((36, 3, 0))


def test_read_jetson_from_device_tree_and_release_file(tmp_path: Path) -> None:
    assert read_jetson(tmp_path) is None
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "etc").mkdir()
    (tmp_path / "proc/device-tree/model").write_bytes(b"NVIDIA Jetson AGX Orin Developer Kit\0")
    (tmp_path / "etc/nv_tegra_release").write_text(NV_TEGRA_RELEASE)
    assert read_jetson(tmp_path) == JetsonInfo("NVIDIA Jetson AGX Orin Developer Kit", (36, 4, 3))


@pytest.mark.parametrize(("machine", "jetson", "driver", "expected"), [
    ("aarch64", JetsonInfo("Orin", (36, 4, 3)), CudaDriver((12, 6), (("Orin", "8.7"),)), "jetson"),
    ("aarch64", JetsonInfo("Orin", (35, 5, 0)), CudaDriver((11, 4), (("Orin", "8.7"),)), None),  # JetPack 5
    ("x86_64", None, CudaDriver((12, 8), (("NVIDIA L4", "8.9"),)), "gpu-cu12"),
    ("x86_64", None, CudaDriver((13, 0), (("NVIDIA H200", "9.0"),)), "gpu-cu13"),
    ("x86_64", None, CudaDriver((13, 0), ()), None),  # a driver without a usable GPU
    ("x86_64", None, None, None),
])
def test_recommended_profile(machine: str, jetson: JetsonInfo | None, driver: CudaDriver | None,
                             expected: str | None) -> None:
    assert recommended_profile(machine, jetson, driver) == expected


def test_report_on_this_machine_names_a_fix_for_each_absent_gpu_piece(capsys: pytest.CaptureFixture[str]) -> None:
    code = doctor.main(argparse.Namespace(package=None, json=True))
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert code == (1 if any(c["status"] == doctor.PROBLEM for c in checks.values()) else 0)
    assert checks["CPU"]["status"] == doctor.OK
    profile = checks["profile"]["detail"]
    for name in ("cuda-python", "NVRTC", "TensorRT"):
        if checks[name]["status"] == doctor.ABSENT and not profile.startswith("none"):
            assert profile in checks[name]["fix"], checks[name]

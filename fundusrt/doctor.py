"""`fundusrt doctor [--package PKG] [--json]`: what this machine can run, and what to install for the rest.

Each check reports what it found and, where something is missing or mismatched, the install profile
(pyproject extra) or step that adds it. Nothing here needs torch, cuda-python or TensorRT: the CUDA
driver is asked through ctypes, the optional libraries only when they are installed, so the doctor
runs on a bare runtime install, a Jetson and a GPU workstation alike.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import re
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fundusrt._deps import available

OK, ABSENT, PROBLEM = "ok", "absent", "problem"
# cuDeviceGetAttribute ids (CUDA driver API, stable since CUDA 3)
_CC_MAJOR, _CC_MINOR = 75, 76
ONNXRUNTIME_GPU_STEP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"
JETSON_ORT_STEP = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu from NVIDIA's JetPack 6 (cu126) wheels"
JETSON_TRT_STEP = ("TensorRT comes with JetPack: apt install python3-libnvinfer, and create the venv with "
                   "--system-site-packages")


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # OK, ABSENT (not installed / no such hardware) or PROBLEM (installed but unusable)
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class CudaDriver:
    """The NVIDIA driver as libcuda reports it."""

    version: tuple[int, int]  # the newest CUDA (major, minor) this driver runs
    devices: tuple[tuple[str, str], ...]  # (name, compute capability "8.7")


@dataclass(frozen=True)
class JetsonInfo:
    """A Jetson's model and L4T release."""

    model: str
    l4t: tuple[int, int, int] | None  # (36, 4, 3) for "R36 (release), REVISION: 4.3"


def parse_l4t_release(text: str) -> tuple[int, int, int] | None:
    """(major, minor, patch) from /etc/nv_tegra_release, e.g. "# R36 (release), REVISION: 4.3, GCID: ..."."""
    match = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def jetpack_for(l4t: tuple[int, int, int]) -> str:
    """The JetPack release line of an L4T version (NVIDIA's Jetson Linux release table)."""
    if l4t[0] == 36:
        return "JetPack 6.1/6.2 (CUDA 12.6, TensorRT 10.3)" if l4t[1] >= 4 else "JetPack 6.0 (CUDA 12.2, TensorRT 8.6)"
    if l4t[0] == 35:
        return "JetPack 5 (CUDA 11.4, TensorRT 8.5)"
    return f"L4T R{l4t[0]} (not a JetPack this release was written for)"


def recommended_profile(machine: str, jetson: JetsonInfo | None, driver: CudaDriver | None) -> str | None:
    """The GPU install profile for this platform, or None where there is none (no NVIDIA GPU, old JetPack)."""
    if jetson is not None:
        return "jetson" if jetson.l4t is not None and jetson.l4t[:2] >= (36, 4) else None
    if driver is None or not driver.devices or machine not in ("x86_64", "aarch64"):
        return None
    return "gpu-cu13" if driver.version[0] >= 13 else "gpu-cu12"


def read_jetson(root: Path = Path("/")) -> JetsonInfo | None:
    """The Jetson model and L4T release, or None off a Jetson."""
    model_file, release_file = root / "proc/device-tree/model", root / "etc/nv_tegra_release"
    if not release_file.is_file():
        return None
    model = model_file.read_bytes().rstrip(b"\0").decode(errors="replace") if model_file.is_file() else "unknown"
    return JetsonInfo(model, parse_l4t_release(release_file.read_text(errors="replace")))


def read_cuda_driver() -> CudaDriver | None:
    """The driver's CUDA version and devices through libcuda (no cuda-python needed); None without a driver."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    devices = []
    count = ctypes.c_int(0)
    # cuInit fails (e.g. CUDA_ERROR_NO_DEVICE) on a machine with a driver but no usable GPU: no devices then
    if cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0:
        for ordinal in range(count.value):
            device, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
            name = ctypes.create_string_buffer(256)
            if cuda.cuDeviceGet(ctypes.byref(device), ordinal) != 0:
                continue
            cuda.cuDeviceGetName(name, 256, device)
            cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device)
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device)
            devices.append((name.value.decode(errors="replace"), f"{major.value}.{minor.value}"))
    return CudaDriver((version.value // 1000, version.value % 1000 // 10), tuple(devices))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _profile_fix(profile: str | None) -> str:
    return f"pip install 'fundusrt[{profile}]'" if profile else "no GPU profile fits this machine (CPU backends only)"


def check_cpu() -> Check:
    from fundusrt.bench.machine import cpu_summary

    resampler = "SIMD resampler built" if available("fundusrt.kernels._resample") else "resampler extension missing"
    return Check("CPU", OK if "missing" not in resampler else PROBLEM,
                 f"{platform.machine()}: {cpu_summary()}; {resampler}",
                 "" if "missing" not in resampler else "reinstall fundusrt with a C compiler (pip install -e .)")


def check_onnxruntime(profile: str | None, jetson: JetsonInfo | None) -> Check:
    if not available("onnxruntime"):
        return Check("onnxruntime", PROBLEM, "not importable (a core dependency)", "pip install onnxruntime")
    import onnxruntime

    providers = onnxruntime.get_available_providers()
    detail = f"{onnxruntime.__version__}, providers: {', '.join(providers)}"
    if "CUDAExecutionProvider" in providers or profile is None:
        return Check("onnxruntime", OK, detail)
    return Check("onnxruntime", ABSENT, detail + " (no CUDA provider: ort-cuda / ort-trt unavailable)",
                 JETSON_ORT_STEP if jetson is not None else ONNXRUNTIME_GPU_STEP)


def check_driver(driver: CudaDriver | None) -> Check:
    if driver is None:
        return Check("CUDA driver", ABSENT, "no NVIDIA driver (libcuda.so.1); the CPU backends run here")
    if not driver.devices:
        return Check("CUDA driver", PROBLEM, f"driver for CUDA {driver.version[0]}.{driver.version[1]} but no usable "
                     "GPU (cuInit failed or no devices)", "check nvidia-smi and the device permissions")
    gpus = "; ".join(f"{name} (compute capability {cc})" for name, cc in driver.devices)
    return Check("CUDA driver", OK, f"CUDA {driver.version[0]}.{driver.version[1]}: {gpus}")


def check_cuda_python(driver: CudaDriver | None, profile: str | None) -> Check:
    version = _version("cuda-bindings") or _version("cuda-python")
    if version is None:
        return Check("cuda-python", ABSENT, "not installed (TensorRT backend and CUDA patching need it)",
                     _profile_fix(profile) if driver else "")
    major = int(version.split(".")[0])
    if driver is not None and major > driver.version[0]:
        return Check("cuda-python", PROBLEM, f"{version} needs a CUDA {major} driver; this one runs CUDA "
                     f"{driver.version[0]}.{driver.version[1]}", _profile_fix(profile))
    detail = version
    if available("cuda.bindings.runtime"):
        from cuda.bindings import runtime

        status, runtime_version = runtime.cudaRuntimeGetVersion()
        if int(status) == 0:
            detail += f", CUDA runtime {runtime_version // 1000}.{runtime_version % 1000 // 10}"
    return Check("cuda-python", OK, detail)


def check_nvrtc(driver: CudaDriver | None, profile: str | None) -> Check:
    from fundusrt.kernels.cuda.build import KernelBuildError, nvrtc_version

    try:
        major, minor = nvrtc_version()
    except (ImportError, KernelBuildError, RuntimeError, OSError) as exc:  # cuda-python's loader raises its own
        return Check("NVRTC", ABSENT, f"not loadable ({exc}); CUDA patching needs it",
                     _profile_fix(profile) if driver else "")
    if driver is not None and major > driver.version[0]:
        return Check("NVRTC", PROBLEM, f"{major}.{minor} builds kernels a CUDA {driver.version[0]} driver cannot load",
                     _profile_fix(profile))
    return Check("NVRTC", OK, f"{major}.{minor} (CUDA patching kernels compile at first use)")


def check_tensorrt(jetson: JetsonInfo | None, profile: str | None) -> Check:
    if not available("tensorrt"):
        fix = JETSON_TRT_STEP if jetson is not None else _profile_fix(profile) if profile else ""
        return Check("TensorRT", ABSENT, "not installed (backends trt, trt-graph and build-engines need it)", fix)
    import tensorrt

    version = tensorrt.__version__
    if jetson is not None and int(version.split(".")[0]) >= 11:
        return Check("TensorRT", PROBLEM, f"{version}: TensorRT 11 does not support JetPack 6", JETSON_TRT_STEP)
    return Check("TensorRT", OK, version)


def check_engines(package: Path) -> Check:
    """Whether the package's engines can run here, with the rebuild command when they cannot."""
    from fundusrt.manifest import Manifest, PackageError
    from fundusrt.runtime.backends.trt_engines import compatibility_problem, current_target, engine_record

    try:
        record = engine_record(Manifest.load(package), package)
    except PackageError as exc:
        return Check("engines", ABSENT, str(exc))
    built = f"built with TensorRT {record.get('tensorrt_version')} on {record.get('gpu_name')}"
    if not available("tensorrt"):
        return Check("engines", ABSENT, f"{built}; this machine has no TensorRT to run them")
    try:
        target = current_target()
    except Exception as exc:  # no driver / device: cuda-python raises its own loader errors
        return Check("engines", PROBLEM, f"{built}; no usable GPU to compare with ({exc})")
    problem = compatibility_problem(record, target, package)
    return Check("engines", PROBLEM, problem) if problem else Check("engines", OK, f"{built}: runs here")


def check_backends() -> Check:
    from fundusrt.runtime.backends.base import BACKENDS, unavailable_reason

    usable = [name for name in BACKENDS if unavailable_reason(name) is None]
    return Check("backends", OK if usable else PROBLEM, ", ".join(usable) or "none")


def diagnose(package: Path | None = None) -> list[Check]:
    """Every check, in the order the report prints them."""
    jetson, driver = read_jetson(), read_cuda_driver()
    profile = recommended_profile(platform.machine(), jetson, driver)
    checks = [check_cpu()]
    if jetson is not None:
        release = ".".join(map(str, jetson.l4t)) if jetson.l4t else "unknown"
        fits = jetson.l4t is not None and profile == "jetson"
        checks.append(Check("Jetson", OK if fits else PROBLEM,
                            f"{jetson.model}, L4T {release}"
                            + (f": {jetpack_for(jetson.l4t)}" if jetson.l4t else ""),
                            "" if fits else "flash JetPack 6.1 or later (TensorRT 10.3, CUDA 12.6)"))
    checks += [check_driver(driver), check_onnxruntime(profile, jetson), check_cuda_python(driver, profile),
               check_nvrtc(driver, profile), check_tensorrt(jetson, profile)]
    if package is not None:
        checks.append(check_engines(package))
    checks.append(check_backends())
    checks.append(Check("profile", OK, profile or "none (CPU only: the base install is complete)"))
    return checks


def render(checks: list[Check]) -> str:
    """The report as text, one check per line and its fix below it."""
    lines = []
    for check in checks:
        lines.append(f"[{check.status:>7}] {check.name}: {check.detail}")
        if check.fix:
            lines.append(f"          -> {check.fix}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the doctor verb."""
    parser.add_argument("--package", default=None, help="also check this package's TensorRT engines against this machine")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def main(args: argparse.Namespace) -> int:
    """Print the report; exit 1 when something installed cannot be used as it is."""
    checks = diagnose(Path(args.package) if args.package else None)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(render(checks))
    return 1 if any(c.status == PROBLEM for c in checks) else 0


def as_dict(checks: list[Check]) -> dict[str, Any]:
    """The checks keyed by name (for reports that embed the doctor's view of the machine)."""
    return {c.name: asdict(c) for c in checks}

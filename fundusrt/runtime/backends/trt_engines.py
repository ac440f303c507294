"""TensorRT engines as a package records them: what they are bound to, and whether they can run here.

Engines are tied to the TensorRT version and GPU that built them; the manifest records both
(`fundusrt build-engines`), and a mismatch is reported with the command that rebuilds them before
TensorRT is asked to load them. Only `current_target` needs tensorrt and cuda-python.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.manifest import Manifest, PackageError, sha256_file

TRT_KEY = "tensorrt"
ENGINE_COMPONENTS = ("vision", "connector", "embed", "decoder")


@dataclass(frozen=True)
class EngineTarget:
    """What a serialized engine is bound to."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (compute capability {self.compute_capability})"


def rebuild_command(package_dir: Path | str, precision: str) -> str:
    """The command that rebuilds a package's engines for this machine."""
    return f"fundusrt build-engines {package_dir} --{precision}"


def engine_record(manifest: Manifest, package_dir: Path | str) -> dict[str, Any]:
    """The manifest's TensorRT record, or PackageError saying how to build engines."""
    record = manifest.extra.get(TRT_KEY)
    if not isinstance(record, dict) or "engines" not in record:
        raise PackageError(f"package {package_dir} has no TensorRT engines; build them on this device with "
                           f"`{rebuild_command(package_dir, 'fp16')}` (or --int8 for a calibrated INT8 package)")
    missing = [c for c in ENGINE_COMPONENTS if c not in record["engines"]]
    if missing:
        raise PackageError(f"package {package_dir} has no engines for {missing}; rebuild with "
                           f"`{rebuild_command(package_dir, record.get('precision', 'fp16'))}`")
    return record


def compatibility_problem(record: dict[str, Any], current: EngineTarget, package_dir: Path | str) -> str | None:
    """Why engines recorded in `record` cannot run on `current`, with the rebuild command; None when they can.

    TensorRT engines are specific to the exact TensorRT version and to the GPU model they were
    built on (kernels are chosen by timing on that GPU), so both must match.
    """
    built = EngineTarget(str(record.get("tensorrt_version")), str(record.get("gpu_name")),
                         str(record.get("compute_capability")))
    differences = []
    if built.tensorrt_version != current.tensorrt_version:
        differences.append(f"TensorRT {built.tensorrt_version} != {current.tensorrt_version}")
    if built.compute_capability != current.compute_capability:
        differences.append(f"compute capability {built.compute_capability} != {current.compute_capability}")
    if built.gpu_name != current.gpu_name:
        differences.append(f"GPU {built.gpu_name!r} != {current.gpu_name!r}")
    if not differences:
        return None
    return (f"the TensorRT engines of {package_dir} were built with {built.describe()}, but this machine has "
            f"{current.describe()} ({'; '.join(differences)}). Engines do not carry over between TensorRT "
            f"versions or GPUs: rebuild them here with `{rebuild_command(package_dir, record.get('precision', 'fp16'))}`")


def verify_engines(record: dict[str, Any], package_dir: Path) -> None:
    """Check every engine file exists and matches its sha256; raise PackageError listing all problems."""
    problems = []
    for component, entry in record["engines"].items():
        path = package_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']} ({component}): missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']} ({component}): sha256 does not match the manifest (changed or corrupt)")
    if problems:
        raise PackageError(f"TensorRT engines of {package_dir} failed their integrity check: " + "; ".join(problems)
                           + f". Rebuild them with `{rebuild_command(package_dir, record.get('precision', 'fp16'))}`")


def current_target(device: int = 0) -> EngineTarget:
    """The TensorRT version and GPU of this machine (needs tensorrt and cuda-python)."""
    trt = require("tensorrt", "TensorRT engines")
    drv = require("cuda.bindings.driver", "TensorRT engines")
    from fundusrt.kernels.cuda_patchify import check_cuda

    check_cuda(drv.cuInit(0), "cuInit")
    dev = check_cuda(drv.cuDeviceGet(device), f"cuDeviceGet({device})")
    name = check_cuda(drv.cuDeviceGetName(256, dev), "cuDeviceGetName")
    attr = drv.CUdevice_attribute
    major = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc major")
    minor = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc minor")
    return EngineTarget(trt.__version__, name.split(b"\0", 1)[0].decode(), f"{major}.{minor}")

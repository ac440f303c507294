"""The machine a bench ran on: hardware, library versions, memory bandwidth, peak memory, package identity.

Memory bandwidth is measured, not looked up: the roofline of decoding compares what the decoder
must read per token with what this machine can stream. Host bandwidth is read bandwidth, as a
decoder only reads its weights: the best of several reductions over a buffer much larger than the
caches, split over the usable cores as the decoder's threads are; GPU DRAM bandwidth, when a CUDA driver and cuda-python are
present, is the best of several device-to-device copies timed with CUDA events.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.manifest import MANIFEST_NAME, Manifest, sha256_file

VERSIONED = ("fundusrt", "numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "tokenizers", "pydicom", "torch",
             "transformers")


def versions() -> dict[str, str]:
    """Installed versions of the libraries that shape the numbers (without importing them)."""
    found = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


# the vector extensions that decide which GEMM kernels torch (oneDNN) and ONNX Runtime (MLAS) run
_SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu_summary() -> str:
    """CPU model, usable cores and vector extensions in one line, e.g. for printing beside timings."""
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
                break
    simd = ", ".join(f for f in _SIMD_FLAGS if f in flags) or "unknown"
    return f"{_cpu_model()}, {_usable_cores()} usable cores, SIMD: {simd}"


def _usable_cores() -> int | None:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def gpus() -> list[dict[str, str]]:
    """GPUs nvidia-smi lists (name, total memory MiB, driver); empty without an NVIDIA driver."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [[c.strip() for c in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]
    return [{"name": r[0], "memory_mib": r[1], "driver": r[2]} for r in rows if len(r) == 3]


def hardware() -> dict[str, Any]:
    """CPU model and counts, host memory, OS, GPUs."""
    import psutil

    return {"cpu": _cpu_model(), "cpu_summary": cpu_summary(), "logical_cores": psutil.cpu_count(logical=True),
            "physical_cores": psutil.cpu_count(logical=False), "usable_cores": _usable_cores(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform(),
            "machine": platform.machine(), "gpus": gpus()}


def host_bandwidth(buffer_mib: int = 1024, repeats: int = 5, threads: int | None = None) -> float:
    """Host read bandwidth in bytes/s: best of `repeats` max-reductions over `buffer_mib` MiB on `threads` threads.

    A max over uint64 does almost no arithmetic per byte (a float sum is compute-bound on some cores), and
    numpy releases the GIL while it reduces, so the threads stream their parts of the buffer at once.
    """
    from concurrent.futures import ThreadPoolExecutor

    buffer = np.ones(buffer_mib * 2**20 // 8, dtype=np.uint64)  # written once: every page is faulted in
    parts = np.array_split(buffer, threads or _usable_cores() or 1)
    best = float("inf")
    with ThreadPoolExecutor(len(parts)) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - start)
    return buffer.nbytes / best


def gpu_bandwidth(buffer_mib: int = 512, repeats: int = 10) -> tuple[float | None, str]:
    """GPU DRAM bandwidth in bytes/s (device-to-device copy, read + write) and how it was measured or why not."""
    try:
        from cuda.bindings import driver as cu
    except ImportError:
        return None, "not measured: cuda-python is not installed (`fundusrt doctor` names the install profile)"

    def check(result: tuple) -> Any:
        err, *rest = result
        if err != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"CUDA driver call failed: {err}")
        return rest[0] if len(rest) == 1 else rest

    try:
        check(cu.cuInit(0))
        context = check(cu.cuDevicePrimaryCtxRetain(check(cu.cuDeviceGet(0))))
        check(cu.cuCtxSetCurrent(context))
        size = buffer_mib * 2**20
        src, dst = check(cu.cuMemAlloc(size)), check(cu.cuMemAlloc(size))
        start, stop = check(cu.cuEventCreate(0)), check(cu.cuEventCreate(0))
        check(cu.cuMemcpyDtoD(dst, src, size))
        check(cu.cuCtxSynchronize())
        best = float("inf")
        for _ in range(repeats):
            check(cu.cuEventRecord(start, 0))
            check(cu.cuMemcpyDtoD(dst, src, size))
            check(cu.cuEventRecord(stop, 0))
            check(cu.cuEventSynchronize(stop))
            best = min(best, check(cu.cuEventElapsedTime(start, stop)) / 1000.0)
        for event in (start, stop):
            check(cu.cuEventDestroy(event))
        for buffer in (src, dst):
            check(cu.cuMemFree(buffer))
    except (RuntimeError, OSError) as exc:  # no driver, no device, or a failing call
        return None, f"not measured: {exc}"
    return 2 * size / best, f"cuMemcpyDtoD of {buffer_mib} MiB, best of {repeats}"


def peak_rss_mib() -> float:
    """High-water RSS of this process in MiB (VmHWM; ru_maxrss may carry a parent's peak across exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def gpu_memory_mib(pid: int | None = None) -> float | None:
    """GPU memory this process holds now (nvidia-smi), None without an NVIDIA driver or when it holds none."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pid = os.getpid() if pid is None else pid
    used = [float(u) for p, u in (line.split(",") for line in out.strip().splitlines() if "," in line)
            if p.strip() == str(pid) and u.strip().replace(".", "").isdigit()]
    return sum(used) if used else None


def package_identity(package_dir: str | Path) -> dict[str, Any]:
    """Name, precision, manifest sha256 and the sha256 of every component file of a model package."""
    root = Path(package_dir)
    manifest = Manifest.load(root)
    files = {}
    for spec in manifest.components.values():
        files[spec.file] = spec.sha256
        files.update(spec.data_files)
    return {"path": str(root), "name": manifest.name, "family": manifest.family, "precision": manifest.precision,
            "manifest_sha256": sha256_file(root / MANIFEST_NAME), "tokenizer_sha256": manifest.tokenizer_sha256,
            "files": files}


def decode_bytes_per_token(package_dir: str | Path, context_len: float) -> dict[str, float]:
    """Bytes one decode step must read: every decoder weight (and one embedding row) plus the KV cache so far.

    Args:
        package_dir: the model package.
        context_len: mean sequence length during decoding (prompt + half the answer).
    """
    root = Path(package_dir)
    manifest = Manifest.load(root)
    decoder, spec = manifest.components["decoder"], manifest.decoder
    weights = (root / decoder.file).stat().st_size + sum((root / f).stat().st_size for f in decoder.data_files)
    embed_row = spec.hidden_size * 4
    # K and V, per layer, per KV head: head_dim values per position, read once per step.
    kv_bytes_per_position = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * _kv_itemsize(manifest)
    return {"weight_bytes": float(weights + embed_row), "kv_bytes": kv_bytes_per_position * context_len,
            "bytes_per_token": weights + embed_row + kv_bytes_per_position * context_len}


def _kv_itemsize(manifest: Manifest) -> int:
    dtypes = {t.dtype for t in manifest.components["decoder"].inputs if t.name.startswith("past")}
    return 2 if dtypes & {"float16", "bfloat16"} else 4

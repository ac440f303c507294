"""Compiling patchify.cu: NVRTC at first use with an on-disk cache, or an nvcc fatbin.

NVRTC needs no GPU or driver, so everything here runs on a build machine. The cache key is the source
hash, the compile options, the target architecture and the NVRTC version; entries are written
atomically so concurrent processes never load half a file.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

from fundusrt._deps import require
from fundusrt.kernels.cuda import HEADER_PATH, SOURCE_PATH
from fundusrt.manifest import atomic_write_bytes, cache_root

# --fmad=false: the host build and Pillow round each multiply and add separately (see patchify.cu)
NVRTC_OPTIONS = ("--std=c++17", "--fmad=false")
FATBIN_ARCHS = ("87", "90")  # Jetson Orin, Hopper


class KernelBuildError(RuntimeError):
    """The CUDA source failed to compile; the message carries the compiler log."""


def source_digest() -> str:
    """sha256 of the kernel source and its header, the part of every cache key that changes with the code."""
    return hashlib.sha256(SOURCE_PATH.read_bytes() + b"\0" + HEADER_PATH.read_bytes()).hexdigest()


def cache_dir() -> Path:
    """$FUNDUSRT_CACHE/cuda, else ~/.cache/fundusrt/cuda."""
    return cache_root() / "cuda"


def fatbin_name() -> str:
    """File name of the fatbin for the current source (a stale fatbin is never picked up)."""
    return f"patchify-{source_digest()[:16]}.fatbin"


def find_fatbin() -> Path | None:
    """A prebuilt fatbin for this source next to the .cu file or in the cache, if any."""
    for folder in (SOURCE_PATH.parent, cache_dir()):
        path = folder / fatbin_name()
        if path.is_file():
            return path
    return None


def build_fatbin(out_dir: Path | None = None, archs: tuple[str, ...] = FATBIN_ARCHS, nvcc: str = "nvcc") -> Path:
    """Compile the kernels with nvcc into a fatbin holding SASS for `archs` plus PTX of the newest.

    Args:
        out_dir: destination folder (default: the cache dir); the file is named by fatbin_name().
        archs: SM versions such as "87" (Orin) and "90" (H100).
        nvcc: the nvcc executable.

    Raises:
        KernelBuildError: nvcc is missing or the compile failed.
    """
    exe = shutil.which(nvcc)
    if exe is None:
        raise KernelBuildError(f"{nvcc} not found on PATH; install the CUDA toolkit or use NVRTC at run time")
    out = (out_dir or cache_dir()) / fatbin_name()
    out.parent.mkdir(parents=True, exist_ok=True)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    tmp = out.with_suffix(".partial")
    cmd = [exe, "-fatbin", "--fmad=false", "-std=c++17", *gencode, "-o", str(tmp), str(SOURCE_PATH)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelBuildError(f"nvcc failed ({' '.join(cmd)}):\n{done.stderr}")
    atomic_write_bytes(out, tmp.read_bytes())
    tmp.unlink()
    return out


def _check(result: object, what: str, program: object = None) -> None:
    nvrtc = require("cuda.bindings.nvrtc", "compiling CUDA kernels")
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if program is not None:
            _, size = nvrtc.nvrtcGetProgramLogSize(program)
            buf = b" " * size
            nvrtc.nvrtcGetProgramLog(program, buf)
            log = buf.decode(errors="replace")
        raise KernelBuildError(f"NVRTC {what} failed: {result}\n{log}")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library cuda-python loads."""
    nvrtc = require("cuda.bindings.nvrtc", "compiling CUDA kernels")
    err, major, minor = nvrtc.nvrtcVersion()
    _check(err, "version query")
    return int(major), int(minor)


def nvrtc_compile(arch: int) -> tuple[bytes, str]:
    """Compile the kernels with NVRTC for compute capability `arch` (e.g. 87, 90), through the disk cache.

    Produces a cubin when this NVRTC knows the architecture, else PTX for the newest one it knows
    below it (the driver JIT-compiles that).

    Returns:
        (image bytes, "cubin" or "ptx").

    Raises:
        KernelBuildError: NVRTC rejected the source, or knows no architecture at or below `arch`.
    """
    nvrtc = require("cuda.bindings.nvrtc", "compiling CUDA kernels")
    major, minor = nvrtc_version()
    err, supported = nvrtc.nvrtcGetSupportedArchs()
    _check(err, "architecture query")
    usable = [a for a in supported if a <= arch]
    if not usable:
        raise KernelBuildError(f"NVRTC {major}.{minor} supports {list(supported)}, nothing for sm_{arch}")
    kind = "cubin" if arch in supported else "ptx"
    target = f"sm_{arch}" if kind == "cubin" else f"compute_{max(usable)}"
    options = (*NVRTC_OPTIONS, f"--gpu-architecture={target}")
    key = hashlib.sha256("\0".join((source_digest(), *options, f"nvrtc{major}.{minor}")).encode()).hexdigest()[:24]
    cached = cache_dir() / f"patchify-{key}-{target}.{kind}"
    if cached.is_file():
        return cached.read_bytes(), kind

    err, program = nvrtc.nvrtcCreateProgram(
        SOURCE_PATH.read_bytes(), SOURCE_PATH.name.encode(), 1, [HEADER_PATH.read_bytes()], [HEADER_PATH.name.encode()]
    )
    _check(err, "program creation")
    try:
        encoded = [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(program, len(encoded), encoded)
        _check(err, f"compile for {target}", program)
        get_size, get = (
            (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN) if kind == "cubin" else (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX)
        )
        err, size = get_size(program)
        _check(err, f"{kind} size query")
        image = b" " * size
        (err,) = get(program, image)
        _check(err, f"{kind} retrieval")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cached, image)
    return image, kind

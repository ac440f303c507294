"""The one place that imports optional dependencies and says which extra provides them."""

from __future__ import annotations

import importlib
from types import ModuleType

# The CUDA pieces come with the install profile of the platform (CUDA 12 or 13 driver, or JetPack 6).
GPU_PROFILES = ("gpu-cu12", "gpu-cu13", "jetson")
# module -> extra(s) of fundusrt that install it
_EXTRA_FOR: dict[str, str | tuple[str, ...]] = {
    "torch": "export",
    "transformers": "export",
    "safetensors": "export",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime_genai": "export",
    "peft": "train",
    "bitsandbytes": "qlora",
    "tensorrt": GPU_PROFILES,
    "cuda": GPU_PROFILES,
    "matplotlib": "bench",
    "psutil": "bench",
    "pynetdicom": "node",
    "highdicom": "node",
    "fpdf": "node",
    "starlette": "ui",
    "jinja2": "ui",
    "uvicorn": "ui",
    "python_multipart": "ui",
    "itsdangerous": "ui",
    "selenium": "dev",
    "dicomweb_client": "node",
    "ray": "scale",
    "pyarrow": "scale",
    "pypdf": "dev",
    "hypothesis": "dev",
}


class MissingDependencyError(ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def require(module: str, purpose: str = "") -> ModuleType:
    """Import `module`, or raise MissingDependencyError naming the fundusrt extra that installs it.

    Args:
        module: dotted module name, e.g. "torch" or "cuda.bindings.nvrtc".
        purpose: what the caller needs it for, quoted in the error message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        root = module.split(".")[0]
        extra = _EXTRA_FOR.get(module) or _EXTRA_FOR.get(root)
        if isinstance(extra, tuple):
            hint = (" or ".join(f"pip install 'fundusrt[{e}]'" for e in extra)
                    + " (`fundusrt doctor` says which fits this machine; on a Jetson TensorRT comes with JetPack)")
        else:
            hint = f"pip install 'fundusrt[{extra}]'" if extra else f"pip install {root}"
        what = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(
            f"{module} is needed{what} but is not installed ({exc}). Install it with: {hint}"
        ) from exc


def available(module: str) -> bool:
    """True when `module` can be imported (without raising for a missing optional dependency)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True

"""The one place that imports optional dependencies and says which extra provides them."""

from __future__ import annotations

import importlib
from types import ModuleType

# module -> extra of fundusrt that installs it
_EXTRA_FOR: dict[str, str] = {
    "torch": "export",
    "transformers": "export",
    "safetensors": "export",
    "onnx": "export",
    "onnxscript": "export",
    "peft": "train",
    "tensorrt": "trt",
    "cuda": "gpu",
    "cuda.bindings": "gpu",
    "matplotlib": "bench",
    "psutil": "bench",
    "pynetdicom": "node",
    "highdicom": "node",
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

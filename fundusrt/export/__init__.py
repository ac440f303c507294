"""Export: PyTorch reference model -> model package (ONNX components + manifest); ONNX -> TensorRT engines.

The ONNX side imports torch; the engine side (`fundusrt.export.tensorrt`) runs on a device that has
none, so this package imports nothing itself and resolves its public names on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fundusrt.export.package import ExportError, export_package

__all__ = ["ExportError", "export_package"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fundusrt.export import package

        return getattr(package, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

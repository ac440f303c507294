"""Export: PyTorch reference model -> model package (ONNX components + manifest). Imports torch."""

from fundusrt.export.package import ExportError, export_package

__all__ = ["ExportError", "export_package"]

"""INT8 calibration: calibration sets recorded from the real pipeline, Q/DQ quantisation, the accuracy gate.

Build-side only (onnx and onnxruntime.quantization); the runtime never imports it.
"""

from fundusrt.calibration.dataset import DEFAULT_MCQS, CalibrationError, CalibrationSet, Prompt, load_prompts
from fundusrt.calibration.gate import GateReport, GateThresholds, evaluate_gate
from fundusrt.calibration.package import (
    CalibrationResult,
    CalibrationSettings,
    GateFailedError,
    calibrate_package,
)
from fundusrt.calibration.quantize import DECODER_MODES, METHODS, QuantOptions

__all__ = [
    "DECODER_MODES",
    "DEFAULT_MCQS",
    "METHODS",
    "CalibrationError",
    "CalibrationResult",
    "CalibrationSet",
    "CalibrationSettings",
    "GateFailedError",
    "GateReport",
    "GateThresholds",
    "Prompt",
    "QuantOptions",
    "calibrate_package",
    "evaluate_gate",
    "load_prompts",
]

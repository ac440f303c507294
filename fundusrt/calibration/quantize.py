"""INT8 quantisation of one exported component with onnxruntime.quantization.

Static INT8 is written as explicit Q/DQ in the form TensorRT consumes (strongly typed networks,
no implicit calibration): symmetric int8 with zero point 0, per-channel weights (output-channel
axis of each MatMul/Gemm/Conv), per-tensor activations. Only MatMuls whose second input is a
weight are quantised: attention's activation x activation products stay in float, as in
TensorRT's and ModelOpt's default INT8 recipes, because their ranges move with every prompt.

Weight-only INT8/INT4 (ORT's MatMulNBits contrib op, block-wise symmetric) is the decoder option
for ONNX Runtime on CPU, where decoding is bound by weight bandwidth; TensorRT cannot build it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.calibration.dataset import CalibrationError

METHODS = ("minmax", "entropy", "percentile")
DECODER_MODES = ("qdq", "int8-weight", "int4-weight", "int4-dq", "fp32")
QDQ_OP_TYPES = ("MatMul", "Gemm", "Conv")
# MatMulNBits accuracy levels (ORT): 0 unset (fp32), 1 fp32, 2 fp16, 3 bf16, 4 int8 compute.
ACCURACY_LEVELS = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class QuantOptions:
    """How the package is quantised.

    Attributes:
        method: activation range method, one of METHODS.
        decoder: "qdq" (static INT8 like the other components), "int8-weight"/"int4-weight"
            (weight-only MatMulNBits, ORT only), "int4-dq" (weight-only INT4 as standard ONNX: block-quantised
            DequantizeLinear before each MatMul, opset 21, the form TensorRT 10+ builds strongly typed) or
            "fp32" (left as exported).
        percentile: the percentile kept by the "percentile" method.
        block_size: weights per quantisation block for the weight-only modes (power of 2, >= 16).
        accuracy_level: MatMulNBits compute type for the weight-only modes: 4 multiplies int8 activations
            by int8 weights on dot-product units (VNNI, NEON sdot), 50-70x faster than level 0 (fp32
            compute with the weights dequantised on every call) on an AVX-512 VNNI CPU; 0 keeps fp32.
        awq: for the weight-only modes, scale weights by the activation-aware search on the recorded
            decoder feeds before rounding (`fundusrt.calibration.awq`); False rounds them as they are (RTN).
    """

    method: str = "minmax"
    decoder: str = "qdq"
    percentile: float = 99.999
    block_size: int = 128
    accuracy_level: int = 4
    awq: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.decoder not in DECODER_MODES:
            raise CalibrationError(f"unknown decoder mode {self.decoder!r}; choose one of {', '.join(DECODER_MODES)}")
        if not 0.0 < self.percentile <= 100.0:
            raise CalibrationError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise CalibrationError(f"block_size must be a power of 2 >= 16, got {self.block_size}")
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise CalibrationError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level}")

    def ranges_tag(self) -> str:
        """Names cached activation ranges: they depend on the method (and percentile), nothing else here."""
        return f"percentile{self.percentile:g}" if self.method == "percentile" else self.method

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "decoder": self.decoder, "percentile": self.percentile,
                "block_size": self.block_size, "accuracy_level": self.accuracy_level, "awq": self.awq}


def _reader(feeds: Sequence[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        """Replays recorded feeds; ORT pulls them one at a time until None."""

        def __init__(self) -> None:
            self._iter: Iterator[dict[str, np.ndarray]] = iter(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._iter = iter(feeds[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._iter, None)

        def __len__(self) -> int:
            return len(feeds)

    return FeedReader()


def _uses_external_data(model_path: Path) -> bool:
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(model_path), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def activation_matmuls(model_path: Path) -> list[str]:
    """Names of MatMul nodes whose second input is not a constant (attention products)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {t.name for t in graph.initializer}
    constants.update(out for node in graph.node if node.op_type == "Constant" for out in node.output)
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] not in constants]


def quantize_qdq(model_path: Path, out_path: Path, feeds: Sequence[dict[str, np.ndarray]], options: QuantOptions,
                 ranges_cache: Path | None = None) -> dict[str, Any]:
    """Write a static INT8 Q/DQ copy of `model_path` to `out_path`, calibrated on `feeds`.

    Args:
        model_path: the fp32 component.
        out_path: where the Q/DQ model goes (its external data, if any, beside it).
        feeds: recorded inputs of this component.
        options: method and percentile.
        ranges_cache: a JSON file of activation ranges; reused when present (same method), else written.

    Returns:
        a summary: op counts of the Q/DQ model and how many weights got quantised.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds and not (ranges_cache and ranges_cache.is_file()):
        raise CalibrationError(f"no calibration samples were recorded for {model_path.name}; "
                               "give more or larger images, or shorter prompts")
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[options.method]
    extra: dict[str, Any] = {
        "ActivationSymmetric": True, "WeightSymmetric": True,
        # Biases stay float (ModelOpt's and TensorRT's form); int32 bias Q/DQ is an ORT QOperator habit.
        "QuantizeBias": False,
        # Output channels: axis 1 of a MatMul weight (K, N), axis 0 of Gemm (transB) / Conv weights.
        "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
        "CalibTensorRangeSymmetric": True,
        # One sample per collection pass: decoder feeds differ in sequence length, which ORT's
        # histogram collector cannot stack, and ranges merge across passes for every method.
        "CalibStridedMinMax": 1,
    }
    if options.method == "percentile":
        extra["CalibPercentile"] = options.percentile
    quantize_static(
        str(model_path), str(out_path), _reader(feeds) if feeds else None,
        quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QDQ_OP_TYPES), per_channel=True,
        reduce_range=False, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        # ORT's MatMulConstBOnly option is not honoured by the QDQ quantiser, hence the explicit list.
        nodes_to_exclude=activation_matmuls(model_path),
        use_external_data_format=_uses_external_data(model_path), calibrate_method=method,
        extra_options=extra, calibration_cache_path=ranges_cache,
    )
    return _summary(out_path)


def quantize_weight_only(model_path: Path, out_path: Path, bits: int, block_size: int,
                         accuracy_level: int, dequantize_linear: bool = False,
                         awq_feeds: Sequence[dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Write a copy of `model_path` whose constant-weight MatMuls are MatMulNBits (`bits` = 4 or 8), or with
    `dequantize_linear`, MatMuls fed by block-quantised INT4 DequantizeLinear (standard ONNX, for TensorRT).

    With `awq_feeds` (the decoder's recorded calibration feeds), weights are first scaled per input
    channel by an activation-aware search (`fundusrt.calibration.awq`), then rounded.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from fundusrt.calibration import awq

    if dequantize_linear and bits != 4:
        raise CalibrationError("block-quantised DequantizeLinear weights are INT4 only (as TensorRT builds them)")
    model = onnx.load(str(model_path))
    scaling = awq.summary(awq.apply_awq(model, awq_feeds, bits, block_size)) if awq_feeds else None
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=bits,
                                          accuracy_level=accuracy_level or None,
                                          quant_format=QuantFormat.QDQ if dequantize_linear else QuantFormat.QOperator,
                                          op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    external = _uses_external_data(model_path)
    quantizer.model.save_model_to_file(str(out_path), use_external_data_format=external)
    return {**_summary(out_path), "scaling": scaling or {"algorithm": "rtn"}}


def _summary(path: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = Counter(node.op_type for node in model.graph.node)
    keep = ("QuantizeLinear", "DequantizeLinear", "MatMulNBits", "MatMul", "Gemm", "Conv")
    return {"ops": {op: ops[op] for op in keep if ops[op]}}

"""`fundusrt calibrate PKG --images DIR_OR_STUDIES --out PKG_INT8`: an accuracy-gated INT8 package."""

from __future__ import annotations

import argparse
import sys

from fundusrt.calibration.gate import add_threshold_arguments, thresholds_from_arguments
from fundusrt.calibration.quantize import DECODER_MODES, METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the calibrate verb."""
    parser.add_argument("package", help="the fp32 model package (from `fundusrt export`)")
    parser.add_argument("--images", required=True, nargs="+",
                        help="DICOM files, study folders or image files (PNG/JPEG/TIFF) to calibrate on")
    parser.add_argument("--out", required=True, help="the INT8 package directory to create")
    parser.add_argument("--prompts", default=None,
                        help="questions: a text file (one per line) or JSON list of strings or "
                             '{"question": ..., "options": [...]} (default: the package\'s plus standard MCQs)')
    parser.add_argument("--method", choices=METHODS, default="minmax", help="activation range method")
    parser.add_argument("--percentile", type=float, default=99.999, help="kept percentile for --method percentile")
    parser.add_argument("--decoder", choices=DECODER_MODES, default="qdq",
                        help="decoder quantisation: static Q/DQ INT8 (TensorRT and ORT), weight-only "
                             "int8/int4 MatMulNBits (ONNX Runtime), weight-only INT4 as block-quantised "
                             "DequantizeLinear (int4-dq: standard ONNX opset 21, for TensorRT), or fp32 (left as "
                             "exported; the choice for a package whose decoder `fundusrt export --decoder int4` built)")
    parser.add_argument("--block-size", type=int, default=128, help="weights per block for weight-only modes")
    parser.add_argument("--accuracy-level", type=int, default=4, choices=range(5), metavar="{0..4}",
                        help="MatMulNBits compute for weight-only modes: 4 = int8 dot products (default, fastest), "
                             "0 = fp32")
    parser.add_argument("--awq", action=argparse.BooleanOptionalAction, default=True,
                        help="weight-only modes: scale weights by an activation-aware search on the calibration "
                             "set before rounding (default); --no-awq rounds them as they are (RTN)")
    parser.add_argument("--holdout", nargs="+", default=None,
                        help="held-out DICOM/image files for the accuracy gate (default: synthetic studies)")
    parser.add_argument("--max-images", type=int, default=32, help="calibration images used")
    parser.add_argument("--holdout-images", type=int, default=8, help="held-out images the gate uses")
    parser.add_argument("--gate-tokens", type=int, default=32, help="answer tokens compared by the gate")
    add_threshold_arguments(parser)
    parser.add_argument("--cache-dir", default=None, help="calibration cache (default: ~/.cache/fundusrt/calibration)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    parser.add_argument("--force", action="store_true", help="write the package even if it fails the gate")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")


def main(args: argparse.Namespace) -> int:
    """Calibrate, gate and write; print the figures and the package path, or why not (exit 1)."""
    from fundusrt.calibration.dataset import CalibrationError
    from fundusrt.calibration.package import CalibrationSettings, GateFailedError, calibrate_package
    from fundusrt.calibration.quantize import QuantOptions
    from fundusrt.manifest import PackageError

    try:
        thresholds = thresholds_from_arguments(args)
        result = calibrate_package(
            args.package, args.images, args.out, prompts_file=args.prompts,
            options=QuantOptions(method=args.method, decoder=args.decoder, percentile=args.percentile,
                                 block_size=args.block_size, accuracy_level=args.accuracy_level, awq=args.awq),
            thresholds=thresholds,
            settings=CalibrationSettings(max_images=args.max_images, holdout_images=args.holdout_images,
                                         gate_tokens=args.gate_tokens),
            holdout=args.holdout, cache_dir=args.cache_dir, force=args.force, overwrite=args.overwrite,
            threads=args.threads)
    except GateFailedError as exc:
        print(exc.report.summary(), file=sys.stderr)
        print(f"fundusrt calibrate: {exc}", file=sys.stderr)
        return 1
    except (CalibrationError, PackageError) as exc:
        print(f"fundusrt calibrate: {exc}", file=sys.stderr)
        return 1
    print(result.gate.summary())
    print(f"calibration set: {result.cache_dir} ({'reused' if result.cache_hit else 'recorded'})")
    print(result.package_dir)
    return 0

"""`fundusrt gate PKG --reference REF`: the accuracy gate for a package quantised by `fundusrt export`."""

from __future__ import annotations

import argparse
import sys

from fundusrt.calibration.gate import add_threshold_arguments, thresholds_from_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the gate verb."""
    parser.add_argument("package", help="the quantised package (e.g. `fundusrt export --decoder int4`); its "
                                        "manifest records the verdict")
    parser.add_argument("--reference", required=True, help="the unquantised export of the same checkpoint")
    parser.add_argument("--holdout", nargs="+", default=None,
                        help="held-out DICOM/image files (default: synthetic studies written for the purpose)")
    parser.add_argument("--prompts", default=None, help="questions, as for `fundusrt calibrate --prompts`")
    parser.add_argument("--holdout-images", type=int, default=8, help="held-out images the gate uses")
    parser.add_argument("--gate-tokens", type=int, default=32, help="answer tokens compared")
    add_threshold_arguments(parser)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def main(args: argparse.Namespace) -> int:
    """Gate the package; print the figures; exit 1 when it fails (the manifest says so either way)."""
    from fundusrt.calibration.dataset import CalibrationError
    from fundusrt.calibration.package import CalibrationSettings, gate_package
    from fundusrt.manifest import PackageError

    try:
        thresholds = thresholds_from_arguments(args)
        report = gate_package(args.package, args.reference, prompts_file=args.prompts, thresholds=thresholds,
                              settings=CalibrationSettings(holdout_images=args.holdout_images,
                                                           gate_tokens=args.gate_tokens),
                              holdout=args.holdout, threads=args.threads)
    except (CalibrationError, PackageError) as exc:
        print(f"fundusrt gate: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    if not report.passed:
        print(f"fundusrt gate: {args.package} fails the accuracy gate ({'; '.join(report.failures)}); "
              "its manifest records the failure", file=sys.stderr)
        return 1
    print(f"{args.package}: gate passed")
    return 0

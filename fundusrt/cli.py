"""`fundusrt <verb>`: each verb lives in its own module, imported only when that verb runs.

A verb module provides `add_arguments(parser)` and `main(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from fundusrt._deps import MissingDependencyError
# verb -> (module, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "synth": ("fundusrt.synth.cli", "write synthetic fundus studies (DICOM) with ground truth"),
    "study": ("fundusrt.dicom.cli", "show what the reader finds in a DICOM file, folder or list"),
    "inspect": ("fundusrt.models.cli", "describe a checkpoint: layout, parameters, tiling, template, missing tensors"),
    "export": ("fundusrt.export.cli", "export a checkpoint into a model package (ONNX + manifest)"),
    "run": ("fundusrt.runtime.cli", "run a DICOM study through a model package and report findings"),
    "train": ("fundusrt.training.cli", "fine-tune (LoRA or full) on LLaVA JSON / InternVL JSONL instruction data"),
    "calibrate": ("fundusrt.calibration.cli", "INT8 Q/DQ package from an fp32 one, calibrated on images and prompts, accuracy-gated"),
    "verify": ("fundusrt.runtime.verify_cli", "hash every file of a model package and stamp it, so later loads skip the hashing"),
    "gate": ("fundusrt.calibration.gate_cli", "accuracy gate of a quantised package against its unquantised export"),
    "build-engines": ("fundusrt.export.tensorrt", "build TensorRT engines (fp16 or Q/DQ INT8) into a package"),
    "protocol": ("fundusrt.bench.protocol_cli", "screening protocols: check, score a labelled set, evaluate (AUC, "
                 "sensitivity, specificity), calibrate the referral threshold"),
    "bench": ("fundusrt.bench.cli", "latency against accuracy of model packages across backends, with a baseline"),
    "serve": ("fundusrt.node.cli", "run the DICOM node: receive studies, send findings back as DICOM"),
    "screen": ("fundusrt.scale.cli", "screen an archive (folder tree, CSV of paths, DICOMweb) in this process or on "
               "Ray, into per-study results and one Parquet table"),
    "review": ("fundusrt.node.review.cli", "the review page (worklist, findings, grader sign-off) over results of "
               "fundusrt run --dicom-out"),
    "demo": ("fundusrt.demo", "synthetic DICOM study -> demo model package -> findings beside the ground truth"),
    "doctor": ("fundusrt.doctor", "what this machine can run (CPU, onnxruntime, CUDA, NVRTC, TensorRT, Jetson) and what to install"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fundusrt", description=__doc__.splitlines()[0])
    parser.add_argument("verb", choices=sorted(VERBS), metavar="VERB",
                        help="; ".join(f"{v}: {h}" for v, (_, h) in sorted(VERBS.items())))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fundusrt` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in VERBS:
        _top_parser().parse_args(argv[:1] or ["--help"])
        return 2
    verb, rest = argv[0], argv[1:]
    module_name, help_text = VERBS[verb]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fundusrt {verb}", description=help_text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except MissingDependencyError as exc:  # a verb run where its extra is not installed: say which, no traceback
        print(f"fundusrt {verb}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

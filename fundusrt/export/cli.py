"""`fundusrt export CHECKPOINT --out PKG`: write a model package from a checkpoint."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the export verb."""
    parser.add_argument("checkpoint", help="checkpoint directory (native fundusrt layout)")
    parser.add_argument("--out", required=True, help="package directory to create")
    parser.add_argument("--max-seq-len", type=int, default=4096, help="longest prompt + answer (KV cache size)")
    parser.add_argument("--max-tiles", type=int, default=None, help="most tiles per image (default: checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace an existing package directory")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"),
                        help="weights and activations of the torch-exported components: fp32 (default; fastest "
                             "for small models on CPUs), fp16/bf16 (half the bytes; GPU and TensorRT targets; "
                             "ONNX Runtime CPU runs fp16 but not bf16)")
    parser.add_argument("--decoder", default="torch", choices=("torch", "fp32", "int8", "int4"),
                        help="torch: the decoder exported by torch.onnx (fp32, KV concatenated per step; runs on "
                             "every backend incl. TensorRT); fp32/int8/int4: built by onnxruntime-genai "
                             "(GroupQueryAttention, KV written in place, int8/int4 weight-only MatMulNBits), the "
                             "fastest on ONNX Runtime CPU. Gate a quantised package with `fundusrt gate`.")
    parser.add_argument("--answers-mcq", action="store_true",
                        help="the model was trained on VLMEvalKit's multiple-choice prompt: declare it in the "
                             "manifest so that `fundusrt bench` runs MCQ sets on this package (default: it does not)")
    parser.add_argument("--block-size", type=int, default=128,
                        help="int8/int4: weights per quantisation block (128: GPTQ/AWQ's usual group; 32 = llama.cpp's "
                             "Q8_0/Q4_0 granularity, slower and larger, for models the gate refuses at 128)")
    parser.add_argument("--accuracy-level", type=int, default=4, choices=(1, 2, 3, 4),
                        help="int8/int4: MatMulNBits compute, 4 = int8 dot products (default, fastest on CPUs)")
    parser.add_argument("--awq-images", nargs="+", default=(),
                        help="int8/int4: DICOM files, study folders or image files whose activations choose "
                             "activation-aware (AWQ) weight scales before rounding (default: none, plain round to "
                             "nearest); 8-16 fundus images of the kind the package will see are enough")
    parser.add_argument("--awq-prompts", default=None,
                        help="questions asked of the AWQ images (the `fundusrt calibrate --prompts` format; default: "
                             "the checkpoint's default questions plus standard MCQs)")
    parser.add_argument("--awq-max-images", type=int, default=16, help="the most AWQ images read")


def main(args: argparse.Namespace) -> int:
    """Run the export; print the package path, or the reason it failed (exit 1)."""
    from fundusrt._deps import require

    require("torch", "export")
    require("onnxscript", "export")
    if args.decoder != "torch":
        require("onnxruntime_genai", f"export --decoder {args.decoder}")
    from fundusrt.export.genai import GenaiDecoderOptions
    from fundusrt.export.package import ExportError, export_package
    from fundusrt.manifest import PackageError
    from fundusrt.models.loader import CheckpointError

    try:
        genai = None if args.decoder == "torch" else GenaiDecoderOptions(
            precision=args.decoder, block_size=args.block_size, accuracy_level=args.accuracy_level,
            awq_images=tuple(args.awq_images), awq_prompts=args.awq_prompts, awq_max_images=args.awq_max_images)
        path = export_package(args.checkpoint, args.out, max_seq_len=args.max_seq_len,
                              max_tiles=args.max_tiles, overwrite=args.force, genai_decoder=genai,
                              dtype=args.dtype, answers_mcq=args.answers_mcq)
    except (CheckpointError, ExportError, PackageError, ValueError) as exc:
        print(f"fundusrt export: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0

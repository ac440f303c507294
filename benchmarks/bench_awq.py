"""INT4/INT8 weight-only decoders: activation-aware scaling (AWQ) against plain rounding (RTN), held out.

    python benchmarks/bench_awq.py PKG --images DIR [DIR ...] --holdout DIR [DIR ...]
                                   [--bits 4] [--block-sizes 32,64,128] [--threads 2] [--json OUT]

PKG is an fp32 package (`fundusrt export`). The calibration set is recorded from --images exactly as
`fundusrt calibrate` records it (the package's questions plus the standard MCQs, two per image, a prefill
and greedy decode steps with real caches); a second set is recorded the same way from --holdout images
that calibration never saw. For each block size the fp32 decoder is quantised twice (RTN and AWQ, the
same ORT quantiser otherwise) and each is compared with the fp32 decoder on the held-out feeds: mean KL
divergence of the next-token distribution, mean logit cosine, top-1 agreement. Not a CI test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package")
    parser.add_argument("--images", nargs="+", required=True, help="calibration DICOM/image files or folders")
    parser.add_argument("--holdout", nargs="+", required=True, help="held-out DICOM/image files or folders")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--block-sizes", default="32,64,128")
    parser.add_argument("--max-images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise

    from fundusrt.calibration.awq import compare_decoders
    from fundusrt.calibration.dataset import SourceImage, iter_source_images, load_prompts, source_files
    from fundusrt.calibration.quantize import quantize_weight_only
    from fundusrt.calibration.record import record_calibration_set
    from fundusrt.runtime.pipeline import load_package

    pipe = load_package(args.package, "ort-cpu", threads=args.threads)
    prompts = load_prompts(None, pipe.default_questions)

    def record(sources: list[str], key: str) -> list[dict]:
        images = [i for i in iter_source_images(source_files(sources)) if isinstance(i, SourceImage)]
        calib = record_calibration_set(pipe, images[:args.max_images], prompts, key=key, prompts_per_image=2,
                                       decode_steps=4)
        return calib.feeds["decoder"]

    calibration, holdout = record(args.images, "calibration"), record(args.holdout, "holdout")
    fp32 = Path(args.package) / pipe.manifest.components["decoder"].file
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for block in (int(b) for b in args.block_sizes.split(",")):
            for name, feeds in (("rtn", None), ("awq", calibration)):
                out = Path(work) / f"decoder-{name}-{block}.onnx"
                summary = quantize_weight_only(fp32, out, args.bits, block, 4, awq_feeds=feeds)
                figures = compare_decoders(fp32, out, holdout)
                rows.append({"bits": args.bits, "block": block, "scaling": name, **figures,
                             "sample_error_ratio": summary["scaling"].get("output_error_ratio")})
                print(f"int{args.bits} block {block:4d} {name}: KL {figures['kl']:.5f}  cosine "
                      f"{figures['cosine']:.5f}  top-1 {figures['top1']:.3f}  ({figures['feeds']} held-out feeds)",
                      flush=True)
    print("\n| bits | block | scaling | KL(fp32 ‖ quant) | logit cosine | top-1 agreement |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| int{row['bits']} | {row['block']} | {row['scaling']} | {row['kl']:.5f} | {row['cosine']:.5f} "
              f"| {row['top1']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"package": pipe.manifest.name, "calibration_feeds": len(calibration),
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

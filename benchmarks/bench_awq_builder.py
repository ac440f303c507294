"""Builder decoders (`fundusrt export --decoder int4|int8`): AWQ (`--awq-images`) against plain rounding, held out.

    python benchmarks/bench_awq_builder.py CHECKPOINT --images DIR [DIR ...] --holdout DIR [DIR ...]
                                           [--precision int4] [--block-sizes 32,128] [--work DIR] [--json OUT]

Exports the checkpoint with an fp32 builder decoder (the reference: the same graph, nothing rounded) and,
per block size, an RTN and an AWQ decoder. Each is run on prompts over the --holdout images (the
checkpoint's default questions, a prefill and 6 decode steps fed the reference's greedy tokens) and
compared with the reference at every position: KL(fp32 || candidate) of the next-token distribution
(mean, median, 90th percentile: the mean is dominated by a few near-tie positions), relative logit
error ||candidate - fp32|| / ||fp32 - mean|| (AWQ's own objective, end to end) and top-1 agreement.
Not a CI test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def _compare(reference, candidates: dict, images: list, questions: list[str], steps: int = 6) -> dict:
    def last(logits: np.ndarray) -> np.ndarray:
        return logits.reshape(-1, logits.shape[-1])[-1].astype(np.float64)

    figures: dict[str, dict[str, list[float]]] = {name: {"kl": [], "rel": [], "top1": []} for name in candidates}
    for image in images:
        encoded = reference.encode_image(image.pixels)
        for question in questions:
            _, embeds = reference.prompt_embeds(encoded, question)
            decoder = reference.sessions.decoder
            decoder.reset()
            want = [last(decoder.prefill(embeds))]
            tokens = []
            for _ in range(steps):
                tokens.append(int(want[-1].argmax()))
                want.append(last(decoder.decode(tokens[-1])))
            for name, pipe in candidates.items():
                other = pipe.sessions.decoder
                other.reset()
                got = [last(other.prefill(embeds))] + [last(other.decode(t)) for t in tokens]
                for w, g in zip(want, got, strict=True):
                    log_p, log_q = w - np.logaddexp.reduce(w), g - np.logaddexp.reduce(g)
                    figures[name]["kl"].append(float(np.sum(np.exp(log_p) * (log_p - log_q))))
                    figures[name]["rel"].append(float(np.linalg.norm(g - w) / np.linalg.norm(w - w.mean())))
                    figures[name]["top1"].append(float(w.argmax() == g.argmax()))
    return {name: {"kl_mean": round(float(np.mean(f["kl"])), 5), "kl_median": round(float(np.median(f["kl"])), 6),
                   "kl_p90": round(float(np.percentile(f["kl"], 90)), 5),
                   "rel_logit_error": round(float(np.mean(f["rel"])), 4), "top1": round(float(np.mean(f["top1"])), 3),
                   "positions": len(f["kl"])}
            for name, f in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--images", nargs="+", required=True, help="AWQ calibration DICOM/image files or folders")
    parser.add_argument("--holdout", nargs="+", required=True, help="held-out DICOM/image files or folders")
    parser.add_argument("--precision", choices=("int4", "int8"), default="int4")
    parser.add_argument("--block-sizes", default="32,128")
    parser.add_argument("--max-holdout", type=int, default=32)
    parser.add_argument("--work", type=Path, default=None, help="where packages are written (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    from fundusrt.calibration.dataset import SourceImage, iter_source_images, source_files
    from fundusrt.export import export_package
    from fundusrt.export.genai import GenaiDecoderOptions
    from fundusrt.runtime.pipeline import load_package

    holdout = [i for i in iter_source_images(source_files(args.holdout)) if isinstance(i, SourceImage)]
    holdout = holdout[:args.max_holdout]
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        def build(name: str, **options: object):
            return load_package(export_package(args.checkpoint, Path(tmp) / name, genai_decoder=GenaiDecoderOptions(
                **options)), threads=2)

        reference = build("fp32", precision="fp32")
        candidates = {}
        for block in (int(b) for b in args.block_sizes.split(",")):
            candidates[f"rtn-b{block}"] = build(f"rtn-{block}", precision=args.precision, block_size=block)
            candidates[f"awq-b{block}"] = build(f"awq-{block}", precision=args.precision, block_size=block,
                                                awq_images=tuple(args.images))
        figures = _compare(reference, candidates, holdout, list(reference.default_questions))
    report = {"precision": args.precision, "holdout_images": len(holdout), "figures": figures}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`fundusrt bench`: latency against accuracy for model packages across backends, with a transformers baseline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

QUICK = {"warmup": 1, "repeats": 3, "latency_items": 1, "limit": 4, "max_new_tokens": 16, "eval_count": 4,
         "screening": 40}
FULL = {"warmup": 2, "repeats": 10, "latency_items": 2, "limit": None, "max_new_tokens": 64, "eval_count": 16,
        "screening": 400}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fundusrt bench`."""
    from fundusrt.runtime.backends.base import BACKENDS

    parser.add_argument("--package", action="append", type=Path, default=[], metavar="PKG",
                        help="model package to bench (repeatable: fp32, INT8, ...); default with --quick: the demo")
    parser.add_argument("--checkpoint", type=Path, metavar="CKPT",
                        help="checkpoint the packages were exported from, for the transformers baseline")
    parser.add_argument("--eval", action="append", type=Path, default=[], metavar="EVALSET", dest="eval_sets",
                        help="VLMEvalKit MCQ TSV, LLaVA/InternVL JSON with references, or a folder of synthetic "
                             "DICOM studies (repeatable; default: synthetic sets of all three kinds)")
    parser.add_argument("--backends", default=",".join(BACKENDS), metavar="LIST",
                        help=f"comma-separated backends (default: {','.join(BACKENDS)}; unavailable ones are "
                             "reported with the reason)")
    parser.add_argument("--baseline", choices=["transformers", "none"], default="transformers",
                        help="baseline every speed is compared with (default: transformers eager generate)")
    parser.add_argument("--quick", action="store_true",
                        help="a short run (< 2 min on 2 CPU cores with the demo package): "
                             + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--out", type=Path, default=Path("build/bench"), metavar="DIR",
                        help="where bench.json, bench.md and pareto.png go (build/bench)")
    parser.add_argument("--work-dir", type=Path, default=None, metavar="DIR",
                        help="demo package and synthetic sets, reused between runs (default: OUT/work)")
    parser.add_argument("--warmup", type=int, metavar="N", help="untimed runs before timing")
    parser.add_argument("--repeats", type=int, metavar="N", help="timed runs of each latency item")
    parser.add_argument("--latency-items", type=int, metavar="N", help="items per eval set timed repeatedly")
    parser.add_argument("--limit", type=int, metavar="N", help="items per eval set scored for accuracy (all)")
    parser.add_argument("--max-new-tokens", type=int, metavar="N", help="answer length limit")
    parser.add_argument("--eval-count", type=int, metavar="N", help="items of each synthetic eval set")
    parser.add_argument("--screening", type=int, metavar="N",
                        help="held-out synthetic cases on which each package's protocol items are scored "
                             "(per-item AUC, sensitivity, specificity with 95%% CIs; ort-cpu; 0: none)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads of every engine (default: each backend's own)")


def main(args: argparse.Namespace) -> int:
    """Run the bench, write its outputs, print the table; 1 with a one-line message on errors."""
    from fundusrt._deps import MissingDependencyError
    from fundusrt.bench.demo import ensure_demo_package
    from fundusrt.bench.evalsets import EvalSetError
    from fundusrt.bench.measure import MeasureSettings
    from fundusrt.bench.output import write_outputs
    from fundusrt.bench.runner import BenchPlan, run_bench
    from fundusrt.bench.synthetic import demo_eval_sets
    from fundusrt.manifest import PackageError

    def log(line: str) -> None:
        print(f"bench: {line}", file=sys.stderr, flush=True)

    preset = QUICK if args.quick else FULL
    pick = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in preset.items()}
    work = args.work_dir or args.out / "work"
    try:
        packages, checkpoint = list(args.package), args.checkpoint
        if not packages:
            if not args.quick:
                raise ValueError("no --package given; pass one or more, or use --quick for the demo package")
            checkpoint, package = ensure_demo_package(work, log)
            packages = [package]
        eval_sets = list(args.eval_sets)
        if not eval_sets:
            log(f"writing synthetic eval sets ({pick['eval_count']} items each) in {work}")
            eval_sets = demo_eval_sets(work, pick["eval_count"])
        settings = MeasureSettings(warmup=pick["warmup"], repeats=pick["repeats"],
                                   latency_items=pick["latency_items"], limit=pick["limit"],
                                   max_new_tokens=pick["max_new_tokens"])
        plan = BenchPlan(packages=packages, backends=[b.strip() for b in args.backends.split(",") if b.strip()],
                         eval_sets=eval_sets, checkpoint=checkpoint, settings=settings, threads=args.threads,
                         baseline=args.baseline == "transformers", bandwidth_mib=128 if args.quick else 256)
        doc = run_bench(plan, log)
        if pick["screening"]:
            from fundusrt.bench.screening import screening_figures

            log(f"scoring each package's protocol on {pick['screening']} held-out synthetic cases")
            doc["screening"] = [screening_figures(p, pick["screening"], args.threads) for p in packages]
        paths = write_outputs(doc, args.out)
    except (EvalSetError, PackageError, MissingDependencyError, ValueError, OSError) as exc:
        print(f"fundusrt bench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    sys.stdout.write(paths["markdown"].read_text(encoding="utf-8"))
    print(f"\nwrote {paths['json']}, {paths['markdown']}, {paths['plot']} in {doc['seconds']:.0f} s")
    return 0

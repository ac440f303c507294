"""`fundusrt protocol {check,score,evaluate,calibrate}`: screening protocols and their operating points.

    fundusrt protocol check FILE [--package PKG]
    fundusrt protocol score --package PKG --count 400 [--set heldout|shifted] --out table.csv
    fundusrt protocol evaluate table.csv [--protocol FILE] [--json OUT]
    fundusrt protocol calibrate table.csv --protocol FILE --target-sensitivity 0.9 --out calibrated.json
    fundusrt protocol gate --count 400 [--package PKG [--protocol FILE]]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fundusrt.runtime.protocol import DEFAULT_PROTOCOL


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Sub-commands of `fundusrt protocol`."""
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a protocol file (and that it fits a package)")
    check.add_argument("file", type=Path)
    check.add_argument("--package", type=Path, help="also check every item fits this model package")
    score = sub.add_parser("score", help="score held-out synthetic cases into a table (case, item, option, p, truth)")
    score.add_argument("--package", type=Path, required=True)
    score.add_argument("--protocol", type=Path, help="default: the package's, else the shipped default")
    score.add_argument("--count", type=int, default=400, help="cases (default: %(default)s)")
    score.add_argument("--set", dest="which", choices=("heldout", "shifted"), default="heldout",
                       help="heldout: the training distribution on unseen seeds; shifted: other sizes, exposure, noise")
    score.add_argument("--first-seed", type=int, help="first seed (default: the demo's held-out seeds, 1000000)")
    score.add_argument("--threads", type=int, default=None)
    score.add_argument("--out", type=Path, required=True, help="the scored table (CSV)")
    evaluate = sub.add_parser("evaluate", help="per-item accuracy, AUC, sensitivity and specificity with 95%% CIs")
    evaluate.add_argument("table", type=Path)
    evaluate.add_argument("--protocol", type=Path, default=DEFAULT_PROTOCOL)
    evaluate.add_argument("--json", dest="json_out", type=Path, help="also write the figures as JSON")
    calibrate = sub.add_parser("calibrate", help="pick the referral threshold for a target sensitivity")
    calibrate.add_argument("table", type=Path, help="a scored table of the labelled set")
    calibrate.add_argument("--protocol", type=Path, default=DEFAULT_PROTOCOL)
    calibrate.add_argument("--target-sensitivity", type=float, required=True)
    calibrate.add_argument("--out", type=Path, required=True, help="the calibrated protocol (a new file)")
    gate = sub.add_parser("gate", help="the gradability gate (pixel checks, and a package's gradability item) on "
                                       "synthetic cases with defects at realistic rates")
    gate.add_argument("--count", type=int, default=400, help="cases (default: %(default)s)")
    gate.add_argument("--package", type=Path, help="also measure this package's gradability item")
    gate.add_argument("--protocol", type=Path, help="with --package: default the package's, else the shipped default")
    gate.add_argument("--threads", type=int, default=None)
    gate.add_argument("--first-seed", type=int, help="first seed (default: the demo's held-out seeds, 1000000)")


def main(args: argparse.Namespace) -> int:
    """Run the sub-command; 1 with a one-line message on errors."""
    from fundusrt.manifest import PackageError

    try:
        commands = {"check": _check, "score": _score, "evaluate": _evaluate, "calibrate": _calibrate, "gate": _gate}
        return commands[args.command](args)
    except (PackageError, ValueError, OSError) as exc:
        print(f"fundusrt protocol {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1


def _check(args: argparse.Namespace) -> int:
    from fundusrt.runtime.protocol import load_protocol, option_token_ids

    protocol = load_protocol(args.file)
    if args.package is not None:
        from tokenizers import Tokenizer

        from fundusrt.manifest import Manifest

        manifest = Manifest.load(args.package)
        tokenizer = Tokenizer.from_file(str(args.package / manifest.tokenizer))
        option_token_ids(protocol, manifest.prompt, tokenizer, manifest.decoder.max_seq_len, manifest.name)
    print(f"{args.file}: protocol {protocol.name} {protocol.version}, {len(protocol.items)} items, referral "
          f"{protocol.referral.item} >= {protocol.referral.threshold}, sha256 {protocol.sha256}"
          + (f"; fits {args.package}" if args.package is not None else ""))
    return 0


def _score(args: argparse.Namespace) -> int:
    from fundusrt.bench.screening import HELDOUT_SEED_START, score_synthetic, write_table
    from fundusrt.runtime.pipeline import load_package

    pipeline = load_package(args.package, threads=args.threads, protocol=args.protocol)
    first = HELDOUT_SEED_START if args.first_seed is None else args.first_seed
    rows, summary = score_synthetic(pipeline, args.count, args.which, first)
    write_table(rows, args.out)
    print(json.dumps({**summary, "protocol": pipeline.protocol.identity(), "table": str(args.out)}, indent=2))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fundusrt.bench.screening import evaluate, read_table
    from fundusrt.runtime.protocol import load_protocol

    protocol = load_protocol(args.protocol)
    cases, sha256 = read_table(args.table)
    figures = evaluate(protocol, cases)
    for item_id, entry in figures.items():
        print(_line(item_id, entry))
    if args.json_out:
        args.json_out.write_text(json.dumps({"table": str(args.table), "table_sha256": sha256,
                                             "protocol": protocol.identity(), "items": figures}, indent=2) + "\n")
    return 0


def _line(item_id: str, entry: dict[str, Any]) -> str:
    def fmt(p: dict[str, Any]) -> str:
        return f"{p['value']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"

    text = f"{item_id:14s} n={entry['n']:4d}  accuracy {fmt(entry['accuracy'])}"
    if "auc" in entry:
        text += (f"  AUC {fmt(entry['auc'])}  at p >= {entry['threshold']:.3f}: sensitivity "
                 f"{fmt(entry['sensitivity'])} specificity {fmt(entry['specificity'])}")
    return text


def _calibrate(args: argparse.Namespace) -> int:
    from fundusrt.bench.screening import calibrate

    record = calibrate(args.protocol, args.table, args.target_sensitivity, args.out)
    print(f"wrote {args.out}: referral threshold {record['threshold']:.6f} for sensitivity >= "
          f"{args.target_sensitivity}: sensitivity {record['sensitivity']['value']:.3f}, specificity "
          f"{record['specificity']['value']:.3f} on {record['set_cases']} cases (table sha256 {record['set_sha256']})")
    return 0


def _gate(args: argparse.Namespace) -> int:
    from fundusrt.bench.screening import HELDOUT_SEED_START, gate_figures

    first = HELDOUT_SEED_START if args.first_seed is None else args.first_seed
    pipeline = None
    if args.package is not None:
        from fundusrt.runtime.pipeline import load_package

        pipeline = load_package(args.package, threads=args.threads, protocol=args.protocol)
    print(json.dumps(gate_figures(args.count, first, pipeline), indent=2))
    return 0

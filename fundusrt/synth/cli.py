"""`fundusrt synth --out DIR --studies N [--seed S] [--size WxH]`: synthetic DICOM studies with ground truth.

Study i is written to DIR/study_NNNN with seed S + i, so runs with the same S are identical.
"""

from __future__ import annotations

import argparse
from collections import Counter

from fundusrt.synth.study import write_study

DEFAULT_SIZE = "1024x768"


def _size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 1024x768 (WIDTHxHEIGHT), got {text!r}") from None
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the `synth` verb."""
    parser.add_argument("--out", required=True, help="folder to write the studies into")
    parser.add_argument("--studies", type=int, default=1, help="number of studies (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first study (default: %(default)s)")
    parser.add_argument("--size", type=_size, default=_size(DEFAULT_SIZE),
                        help=f"picture size WIDTHxHEIGHT, each 256-8192 (default: {DEFAULT_SIZE})")
    parser.add_argument("--instructions", action="store_true",
                        help="write instruction data (images + LLaVA JSON / InternVL JSONL) instead of DICOM "
                             "studies, one case per study count")
    parser.add_argument("--format", choices=["llava", "internvl"], default="llava",
                        help="instruction data format (default: %(default)s)")
    parser.add_argument("--types", default=None,
                        help="comma-separated question types (default: all; see fundusrt.synth.instructions)")
    parser.add_argument("--mirror", action="store_true", help="also write each case mirrored (the other eye)")
    parser.add_argument("--one-question", action="store_true",
                        help="one record per question (no answer can be copied from another in the conversation)")


def main(args: argparse.Namespace) -> int:
    """Write the studies and print one line per study."""
    if args.studies < 1 or args.seed < 0:
        print("fundusrt synth: --studies must be at least 1 and --seed non-negative")
        return 2
    if args.instructions:
        from fundusrt.synth.instructions import QUESTION_TYPES, write_instructions

        types = tuple(args.types.split(",")) if args.types else QUESTION_TYPES
        unknown = sorted(set(types) - set(QUESTION_TYPES))
        if unknown:
            print(f"fundusrt synth: unknown question types {unknown}; known: {', '.join(QUESTION_TYPES)}")
            return 2
        path = write_instructions(args.out, count=args.studies, seed_start=args.seed, types=types,
                                  sizes=(args.size,), fmt=args.format, mirror=args.mirror,
                                  one_question=args.one_question)
        print(f"{path}: {args.studies} case(s){' (+ mirrored)' if args.mirror else ''}, question types {', '.join(types)}")
        return 0
    for i in range(args.studies):
        truth = write_study(f"{args.out}/study_{i:04d}", args.seed + i, size=args.size)
        eyes = Counter(entry["laterality"] for entry in truth.instances.values())
        grades = {entry["laterality"]: entry["dr_grade"] for entry in truth.instances.values()}
        print(f"{truth.out_dir}: {len(truth.instances)} instance(s) (R {eyes['R']}, L {eyes['L']}), "
              f"DR grade R {grades['R']} / L {grades['L']}, ground truth {truth.ground_truth_path.name}")
    return 0

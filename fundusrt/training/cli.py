"""`fundusrt train CONFIG`: fine-tune (LoRA or full) or train from scratch, as the JSON config says.

`fundusrt train CONFIG --plan [--devices 1x24GB,4x24GB]` prints the memory each device needs for CONFIG
(weights, adapters, optimizer state, activations with and without checkpointing) and whether it fits,
from the checkpoint's config.json alone. Several GPUs: `torchrun --nproc-per-node N --no-python fundusrt
train CONFIG` with `"distributed": {"strategy": "ddp" | "fsdp"}` in CONFIG.

`fundusrt train --evaluate PACKAGE --data FILE [--out eval.json]` scores an exported package per
question type on annotated instruction data (held-out synthetic sets), through the runtime.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the train verb."""
    parser.add_argument("config", nargs="?", help="training config JSON (see fundusrt.training.config.TrainConfig)")
    parser.add_argument("--max-steps", type=int, default=None, help="override the config's max_steps")
    parser.add_argument("--no-resume", action="store_true", help="start over even if output_dir has checkpoints")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory per device the config needs, and whether it fits; loads no weights")
    parser.add_argument("--devices", help="with --plan: comma-separated COUNTxMEMORY GPU sets or cpu:MEMORY, e.g. "
                        "1x24GB,1x80GB,4x24GB (default: this machine's GPUs, or its CPU memory)")
    parser.add_argument("--evaluate", metavar="PACKAGE", help="score this model package instead of training")
    parser.add_argument("--data", help="with --evaluate: annotated LLaVA JSON / InternVL JSONL file")
    parser.add_argument("--limit", type=int, default=None, help="with --evaluate: at most this many images")
    parser.add_argument("--out", help="with --evaluate: also write the figures to this JSON file")


def _evaluate(args: argparse.Namespace) -> int:
    from fundusrt.manifest import PackageError, atomic_write_text
    from fundusrt.training.evaluate import evaluate_package
    from fundusrt.training.records import DataError

    if not args.data:
        print("fundusrt train: --evaluate needs --data FILE (annotated instruction data)", file=sys.stderr)
        return 2
    try:
        result = evaluate_package(args.evaluate, args.data, limit=args.limit)
    except (PackageError, DataError, OSError) as exc:
        print(f"fundusrt train --evaluate: {exc}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        atomic_write_text(args.out, text)
    print(text, end="")
    return 0


def _local_devices() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}GiB"
    return f"cpu:{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f}GiB"


def _plan(args: argparse.Namespace) -> int:
    from fundusrt.models.loader import CheckpointError
    from fundusrt.training.config import TrainConfig
    from fundusrt.training.planner import Devices, plan

    try:
        config = TrainConfig.load(args.config)
        specs = [Devices.parse(text) for text in (args.devices or _local_devices()).split(",")]
        for devices in specs:
            print(plan(config, devices).table())
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"fundusrt train --plan: {exc}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    """Train (or evaluate); print the merged checkpoint path, or why it failed (exit 1)."""
    from fundusrt._deps import require

    if args.evaluate:
        return _evaluate(args)
    if not args.config:
        print("fundusrt train: give a CONFIG file (or --evaluate PACKAGE --data FILE)", file=sys.stderr)
        return 2
    require("torch", "train")
    require("peft", "train")
    if args.plan:
        return _plan(args)
    from fundusrt.models.loader import CheckpointError
    from fundusrt.training.config import TrainConfig
    from fundusrt.training.records import DataError
    from fundusrt.training.trainer import train

    try:
        config = TrainConfig.load(args.config)
        if args.max_steps is not None:
            config.max_steps = args.max_steps
        if args.no_resume:
            config.resume = False
        result = train(config)
    except (DataError, CheckpointError, ValueError, OSError) as exc:
        print(f"fundusrt train: {exc}", file=sys.stderr)
        return 1
    if result is not None:  # torchrun ranks other than 0 write nothing
        print(result.merged_dir)
    return 0

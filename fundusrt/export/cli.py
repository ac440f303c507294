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


def main(args: argparse.Namespace) -> int:
    """Run the export; print the package path, or the reason it failed (exit 1)."""
    from fundusrt._deps import require

    require("torch", "export")
    require("onnxscript", "export")
    from fundusrt.export.package import ExportError, export_package
    from fundusrt.models.loader import CheckpointError

    try:
        path = export_package(args.checkpoint, args.out, max_seq_len=args.max_seq_len,
                              max_tiles=args.max_tiles, overwrite=args.force)
    except (CheckpointError, ExportError) as exc:
        print(f"fundusrt export: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0

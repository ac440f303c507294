"""`fundusrt verify PKG`: hash every file of a model package now, and stamp it so later loads need not."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the verify verb."""
    parser.add_argument("package", nargs="+", help="model package directories")


def main(args: argparse.Namespace) -> int:
    """Verify each package (full sha256); exit 1 if any fails."""
    from fundusrt.manifest import Manifest, PackageError

    failed = 0
    for package in args.package:
        start = time.perf_counter()
        try:
            Manifest.load(package).verify_stamped(package, force=True)
        except PackageError as exc:
            print(f"fundusrt verify: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{package}: every file matches its sha256 ({time.perf_counter() - start:.1f} s); stamped")
    return 1 if failed else 0

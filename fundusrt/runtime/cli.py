"""`fundusrt run STUDY --package PKG`: answer questions for every fundus image of a DICOM study."""

from __future__ import annotations

import argparse
import sys

from fundusrt.runtime.backends.base import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fundusrt run`."""
    parser.add_argument("study", nargs="+", help="a DICOM file, a folder, or several files of one study")
    parser.add_argument("--package", required=True, help="model package directory (from `fundusrt export`)")
    parser.add_argument("--question", action="append", dest="questions", metavar="Q",
                        help="question to ask about every image (repeatable; default: the package's questions)")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length limit (128)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="intra-op threads per session")
    parser.add_argument("--backend", default="ort-cpu", choices=sorted(BACKENDS), help="inference backend (ort-cpu)")


def main(args: argparse.Namespace) -> int:
    """Run the study, print the text report, write JSON when asked; 1 with a one-line message on errors."""
    # Imported here so that `fundusrt run --help` stays fast.
    from fundusrt._deps import MissingDependencyError
    from fundusrt.config import GenerationConfig
    from fundusrt.manifest import PackageError
    from fundusrt.runtime.backends.base import BackendError
    from fundusrt.runtime.pipeline import load_package

    source = args.study[0] if len(args.study) == 1 else args.study
    try:
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
        pipeline = load_package(args.package, backend=args.backend, threads=args.threads)
        report = pipeline.run_study(source, args.questions, gen)
        if args.json_out:
            report.write_json(args.json_out)
    except (PackageError, BackendError, MissingDependencyError, ValueError, OSError) as exc:
        print(f"fundusrt run: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    sys.stdout.write(report.render_text())
    return 0

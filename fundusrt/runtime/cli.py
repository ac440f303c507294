"""`fundusrt run STUDY --package PKG`: answer questions for every fundus image of a DICOM study."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from fundusrt.runtime.backends.base import BACKENDS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fundusrt run`."""
    parser.add_argument("study", nargs="+", help="a DICOM file, a folder, or several files of one study")
    parser.add_argument("--package", required=True, help="model package directory (from `fundusrt export`)")
    parser.add_argument("--question", action="append", dest="questions", metavar="Q",
                        help="question to ask about every image (repeatable; default: the package's questions)")
    parser.add_argument("--protocol", type=Path, metavar="FILE",
                        help="screening protocol JSON (default: the package's protocol.json, else the shipped "
                             "default: fundusrt/runtime/protocols/synthetic-screening.json)")
    parser.add_argument("--json", dest="json_out", metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument("--dicom-out", type=Path, metavar="DIR",
                        help="also write DICOM results into DIR: a Comprehensive SR, a Secondary Capture with the "
                             "lesion boxes per image that has any, and the JSON report (needs fundusrt[node])")
    parser.add_argument("--stow", metavar="URL",
                        help="post the DICOM results (SR, SC, PDF) to this DICOMweb service root with STOW-RS "
                             "(kept in --dicom-out DIR when given too)")
    parser.add_argument("--pdf", action="store_true", help="with --dicom-out or --stow: add an Encapsulated PDF report")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length limit (128)")
    parser.add_argument("--threads", type=int, default=None, metavar="N", help="intra-op threads per session")
    parser.add_argument("--tiles-per-call", type=int, default=None, metavar="N",
                        help="most tiles of a study's images sent through the vision tower in one call (default "
                             "16; 1 encodes one image at a time, which bounds the tower's activation memory)")
    parser.add_argument("--backend", default="ort-cpu", choices=sorted(BACKENDS), help="inference backend (ort-cpu)")


def main(args: argparse.Namespace) -> int:
    """Run the study, print the text report, write JSON and DICOM results when asked.

    Returns 1 with a one-line message on errors, 2 for --pdf without --dicom-out.
    """
    # Imported here so that `fundusrt run --help` stays fast.
    from fundusrt._deps import MissingDependencyError
    from fundusrt.config import GenerationConfig
    from fundusrt.manifest import PackageError
    from fundusrt.runtime.backends.base import BackendError
    from fundusrt.runtime.pipeline import load_package

    if args.pdf and args.dicom_out is None and args.stow is None:
        print("fundusrt run: error: --pdf is part of the DICOM results: add --dicom-out DIR", file=sys.stderr)
        return 2
    source = args.study[0] if len(args.study) == 1 else args.study
    try:
        gen = GenerationConfig(max_new_tokens=args.max_new_tokens)
        pipeline = load_package(args.package, backend=args.backend, threads=args.threads, protocol=args.protocol)
        if args.tiles_per_call is not None:
            if args.tiles_per_call < 1:
                raise ValueError(f"--tiles-per-call must be at least 1, got {args.tiles_per_call}")
            pipeline.max_tiles_per_call = args.tiles_per_call
        report = pipeline.run_study(source, args.questions, gen)
        if args.json_out:
            report.write_json(args.json_out)
    except (PackageError, BackendError, MissingDependencyError, ValueError, OSError) as exc:
        print(f"fundusrt run: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    sys.stdout.write(report.render_text())
    if args.dicom_out is None and args.stow is None:
        return 0
    # After the text report, so that a failure here still leaves the findings on screen.
    with tempfile.TemporaryDirectory(prefix="fundusrt-results-") as scratch:
        try:
            written = _write_dicom(report, args.dicom_out or Path(scratch), args.pdf)
        except (MissingDependencyError, ValueError, OSError) as exc:
            print(f"fundusrt run: error: cannot write DICOM results: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        for result in written.files if args.dicom_out is not None else []:
            print(f"wrote {result.path}")
        for warning in written.warnings:
            print(f"fundusrt run: warning: {warning}", file=sys.stderr)
        if args.stow is not None:
            return _stow(args.stow, [r.path for r in written.files if r.sop_instance_uid is not None])
    return 0


def _stow(url: str, paths: list[Path]) -> int:
    """Post the result objects with STOW-RS; one line per object refused, with the service's reason."""
    from fundusrt._deps import MissingDependencyError
    from fundusrt.dicom.dicomweb import DicomWebError, StowError, stow

    try:
        outcomes = stow(url, paths)
    except StowError as exc:
        for outcome in exc.outcomes:
            if not outcome.stored:
                print(f"fundusrt run: error: STOW-RS did not store {outcome.path.name}: {outcome.reason}",
                      file=sys.stderr)
        print(f"stowed {sum(o.stored for o in exc.outcomes)} of {len(exc.outcomes)} object(s) to {url}")
        return 1
    except (DicomWebError, MissingDependencyError) as exc:
        print(f"fundusrt run: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(f"stowed {len(outcomes)} object(s) to {url}")
    return 0


def _write_dicom(report: Any, out_dir: Path, write_pdf: bool) -> Any:
    """Write the DICOM results of `report` into `out_dir` (created if missing); returns `WrittenResults`."""
    from fundusrt.dicom.results import write_results

    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--dicom-out {out_dir} exists and is not a folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_results(report, out_dir, write_pdf=write_pdf)

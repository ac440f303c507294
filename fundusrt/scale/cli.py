"""`fundusrt screen SOURCE --package PKG --out DIR`: screen an archive (folder tree, CSV of paths, DICOMweb)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `fundusrt screen`."""
    parser.add_argument("source", help="a folder tree of DICOM files, a .csv of paths (column 'path'), or a DICOMweb "
                                       "service root URL (QIDO-RS lists the studies, WADO-RS fetches them)")
    parser.add_argument("--package", required=True, help="model package directory (from `fundusrt export`)")
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder: studies/<StudyInstanceUID>/ (JSON report, SR, SC, PDF), "
                             "results.parquet (one row per eye), summary.json")
    parser.add_argument("--protocol", type=Path, metavar="FILE",
                        help="screening protocol JSON (default: the package's, else the shipped default)")
    parser.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                        help="run on Ray Data: 'auto' (the default when given without a value: the running "
                             "cluster, else a new local one) or a cluster address; without --ray: in this process")
    parser.add_argument("--workers", type=int, default=1, metavar="N", help="Ray actors, one package each (1)")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="F",
                        help="CPUs Ray reserves per actor, also its inference threads (1)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, metavar="F",
                        help="GPU share per Ray actor, e.g. 0.5 for two per GPU (0: none; use with --backend ort-cuda)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="studies per worker call (4)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out: studies done are skipped, failed ones run again")
    parser.add_argument("--stow", metavar="URL", help="post the DICOM results to this DICOMweb service (STOW-RS)")
    parser.add_argument("--pdf", action="store_true", help="add an Encapsulated PDF report to each study's results")
    parser.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="answer length limit (128)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="intra-op threads per package (default: all cores in this process, "
                             "--cpus-per-worker on Ray)")
    parser.add_argument("--backend", default="ort-cpu", help="inference backend (ort-cpu)")


def main(args: argparse.Namespace) -> int:
    """Run the screening; 0 when every study was screened, 1 when some failed (see the table), 2 on bad usage."""
    from fundusrt._deps import MissingDependencyError
    from fundusrt.dicom.dicomweb import DicomWebError
    from fundusrt.manifest import PackageError
    from fundusrt.runtime.backends.base import BackendError
    from fundusrt.scale.runner import PLAN_DIR, RayOptions, screen
    from fundusrt.scale.sources import SourceError, open_source
    from fundusrt.scale.worker import ScreenSettings

    if args.workers < 1 or args.cpus_per_worker <= 0 or args.gpus_per_worker < 0:
        print("fundusrt screen: error: --workers must be >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0",
              file=sys.stderr)
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"fundusrt screen: error: --out {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    settings = ScreenSettings(package=str(args.package), out_dir=str(args.out),
                              protocol=str(args.protocol) if args.protocol else None, backend=args.backend,
                              threads=args.threads, max_new_tokens=args.max_new_tokens, write_pdf=args.pdf,
                              stow_url=args.stow)
    ray = None
    if args.ray is not None:
        ray = RayOptions(address=args.ray, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                         gpus_per_worker=args.gpus_per_worker)
    try:
        # Checked here, before any listing: a package that cannot load would fail every study.
        _check_package(args.package, args.backend, args.protocol)
        refs = open_source(args.source, args.out / PLAN_DIR / "index.sqlite")
        summary = screen(refs, settings, resume=args.resume, batch_size=args.batch_size, ray=ray)
    except (SourceError, FileExistsError, PackageError, BackendError, MissingDependencyError, DicomWebError,
            ValueError, OSError) as exc:
        print(f"fundusrt screen: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1 if isinstance(exc, MissingDependencyError) else 2
    run = summary["this_run"]
    for key, reason in list(summary["failures"].items())[:20]:
        print(f"failed: {key}: {reason}")
    if summary["failed"] > 20:
        print(f"... and {summary['failed'] - 20} more failed (see results.parquet)")
    print(f"screened {run['studies']} studies in {run['wall_seconds']:.1f} s ({run['failed']} failed, "
          f"{run['skipped_as_done']} already done) on {run['workers']} worker(s), {run['engine']}: "
          f"{run['studies_per_hour']:.0f} studies/hour; table {args.out / 'results.parquet'}: "
          f"{summary['done']} done, {summary['failed']} failed")
    return 1 if summary["failed"] else 0


def _check_package(package: str, backend: str, protocol: Path | None) -> None:
    from fundusrt.runtime.pipeline import load_package

    load_package(package, backend=backend, threads=1, protocol=protocol)

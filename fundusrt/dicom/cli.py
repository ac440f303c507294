"""`fundusrt study PATH... [--json]`: what the reader finds, one entry per file.

Exit status: 0 when at least one fundus image was loaded, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json

from pydicom.uid import UID

from fundusrt.dicom.decode import DEFAULT_MAX_PIXELS
from fundusrt.dicom.model import FileResult
from fundusrt.dicom.reader import read_study
from fundusrt.dicom.select import describe_sop_class


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the `study` verb."""
    parser.add_argument("path", nargs="+", help="DICOM file(s) or folder(s), searched recursively")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="refuse images with more pixels than this over all frames (default: %(default)s)")


def _line(result: FileResult) -> str:
    syntax = UID(result.transfer_syntax).name if result.transfer_syntax else "-"
    size = f"{result.columns}x{result.rows}" if result.rows and result.columns else "-"
    sop = describe_sop_class(result.sop_class) if result.sop_class else "-"
    # a laterality read from the picture (no tag) is marked with "*"
    eye = (result.laterality or "-") + ("*" if result.laterality and result.laterality_source == "image" else "")
    line = (f"{result.status:<8} {eye:<2} {size:>10} x{result.frames:<3} "
            f"{result.photometric_interpretation or '-':<14} {syntax} | {sop} | {result.file}\n"
            f"         {result.reason}")
    if result.laterality_source == "image" and result.laterality:
        line += (f"\n         laterality {result.laterality} read from the picture (no tag; confidence "
                 f"{result.image_laterality_confidence:.2f})")
    if result.laterality_mismatch:
        line += (f"\n         WARNING: laterality tag {result.laterality} but the picture shows "
                 f"{result.image_laterality} (confidence {result.image_laterality_confidence:.2f})")
    return line


def main(args: argparse.Namespace) -> int:
    """Read the study and print one entry per file."""
    study = read_study(args.path, max_pixels=args.max_pixels)
    if args.json:
        print(json.dumps([r.to_dict() for r in study.files], indent=2))
    else:
        for result in study.files:
            print(_line(result))
        lateralities = sorted({im.laterality or "?" for im in study.images})
        print(f"{len(study.images)} fundus image(s) from {len(study.files)} file(s); "
              f"eyes: {', '.join(lateralities) or '-'}; {len(study.errors())} file(s) not loaded")
    return 0 if study.images else 1

"""Read DICOM files, folders or lists into a Study of fundus images.

Error policy: `read_dicom_file` turns every problem a file can have (not DICOM, truncated, corrupt
structure, unsupported syntax, bomb-sized, not a fundus photograph) into a FileResult and never
raises for bad input; the third-party parsers and decoders it calls are wrapped stage by stage so
the message says which stage failed. `read_study` adds one more guard per file, so that even a bug
in this module costs one file, not the study.

Nothing identifying leaves this module: results and log lines carry paths, UIDs, geometry and
reasons written here, never patient or institution attributes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fundusrt.dicom.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_frames
from fundusrt.dicom.laterality import check_laterality, image_laterality
from fundusrt.dicom.model import STATUS_ERROR, STATUS_OK, STATUS_REJECTED, FileResult, FundusImage, Study
from fundusrt.dicom.select import clean_code_string, clean_uid, select_fundus, sop_class_of

logger = logging.getLogger(__name__)

_LATERALITIES = ("R", "L")
_MAX_DEVICE = 64


def _text(ds: Dataset, keyword: str, *, file_meta: bool = False) -> str:
    """A header value as stripped text, "" when absent or unreadable."""
    try:
        source = ds.get("file_meta", Dataset()) if file_meta else ds
        value = source.get(keyword, "")
        return "" if value is None else str(value).strip()
    except Exception:
        return ""


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except Exception:
        return default


def laterality_of(ds: Dataset) -> str | None:
    """R or L from ImageLaterality (0020,0062), else from series Laterality (0020,0060), else None."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = _text(ds, keyword).upper()
        if value in _LATERALITIES:
            return value
    return None


def _header_result(path: str, ds: Dataset) -> FileResult:
    """A FileResult filled with what the header says, before any verdict."""
    syntax = clean_uid(_text(ds, "TransferSyntaxUID", file_meta=True))
    return FileResult(
        file=path, status=STATUS_ERROR, reason="", laterality=laterality_of(ds),
        rows=_int(ds, "Rows"), columns=_int(ds, "Columns"), frames=_int(ds, "NumberOfFrames", 1),
        photometric_interpretation=clean_code_string(_text(ds, "PhotometricInterpretation")),
        transfer_syntax=syntax, sop_class=sop_class_of(ds),
    )


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records while reading: they quote raw header values (PHI).

    The level is raised on the "pydicom" logger itself because its child loggers (decoders) inherit
    it, which a filter would not achieve.
    """
    pydicom_logger = logging.getLogger("pydicom")
    previous = pydicom_logger.level
    pydicom_logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.setLevel(previous)


def _read_dataset(path: Path) -> Dataset:
    """dcmread with parse failures turned into short, stage-named messages (raises ValueError)."""
    try:
        return dcmread(path)
    except InvalidDicomError as exc:
        raise ValueError("not a DICOM file (no 'DICM' marker after the 128-byte preamble and no "
                         "recognisable data set)") from exc
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        raise ValueError(f"cannot be opened ({type(exc).__name__}: {exc.strerror})") from exc
    except Exception as exc:  # the parser raises many types on corrupt input
        message = str(exc)
        message = message if len(message) <= 200 else message[:200] + "..."
        raise ValueError(f"DICOM structure is corrupt or truncated ({type(exc).__name__}: {message})") from exc


def read_dicom_file(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[FundusImage], FileResult]:
    """Read one file: its fundus frames (one FundusImage per frame) and what happened.

    Args:
        path: the file.
        max_pixels: refuse images with more than this many pixels over all frames (decompression bombs).

    Returns:
        (images, result); images is empty unless result.status == "ok".
    """
    name = str(path)
    with quiet_pydicom():
        try:
            ds = _read_dataset(Path(path))
        except ValueError as exc:
            return [], FileResult(file=name, status=STATUS_ERROR, reason=str(exc))
        result = _header_result(name, ds)
        selection = select_fundus(ds)
        if not selection.accepted:
            result.status, result.reason = STATUS_REJECTED, selection.reason
            return [], result
        try:
            frames = decode_frames(ds, max_pixels=max_pixels)
        except DecodeError as exc:
            result.reason = f"{selection.reason}: {exc}"
            return [], result
        images = _images(ds, frames, name, result)
    result.status = STATUS_OK
    result.frames = len(images)
    first = images[0]
    result.laterality, result.laterality_source = first.laterality, first.laterality_source
    result.image_laterality = first.image_laterality
    result.image_laterality_confidence = first.image_laterality_confidence
    result.laterality_mismatch = any(im.laterality_mismatch for im in images)
    result.rows, result.columns = images[0].rows, images[0].columns
    result.reason = f"{selection.reason}: {len(images)} frame(s) decoded"
    return images, result


def _images(ds: Dataset, frames: list[np.ndarray], name: str, result: FileResult) -> list[FundusImage]:
    device = " ".join(filter(None, (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName"))))
    device = "".join(c for c in device if c.isascii() and c.isprintable())
    # the header's laterality is checked against each frame's picture (wrong or missing tags are a
    # known source of clinical error); the tag still wins, a confident disagreement is flagged
    checks = [check_laterality(result.laterality, image_laterality(pixels)) for pixels in frames]
    return [
        FundusImage(
            pixels=pixels, laterality=check.laterality, laterality_source=check.laterality_source,
            image_laterality=check.image_laterality, image_laterality_confidence=check.image_laterality_confidence,
            laterality_mismatch=check.laterality_mismatch,
            sop_instance_uid=clean_uid(_text(ds, "SOPInstanceUID")),
            series_instance_uid=clean_uid(_text(ds, "SeriesInstanceUID")),
            study_instance_uid=clean_uid(_text(ds, "StudyInstanceUID")), sop_class_uid=result.sop_class,
            modality=clean_code_string(_text(ds, "Modality")),
            photometric_interpretation=result.photometric_interpretation,
            transfer_syntax_uid=result.transfer_syntax, frame_index=index, device=device[:_MAX_DEVICE],
            rows=int(pixels.shape[0]), columns=int(pixels.shape[1]), source=name,
        )
        for index, (pixels, check) in enumerate(zip(frames, checks, strict=True))
    ]


def _expand(source: str | Path | Sequence[str | Path]) -> Iterator[Path]:
    """Files named by `source`: a file, a folder (recursively, sorted), or a list of either."""
    entries = [source] if isinstance(source, (str, Path)) else list(source)
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            # os.walk without following links: a link cycle in a clinic share must not loop forever.
            for root, dirs, files in os.walk(path, followlinks=False):
                dirs.sort()
                for file_name in sorted(files):
                    yield Path(root) / file_name
        else:
            yield path


def read_study(source: str | Path | Sequence[str | Path], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Study:
    """Read every file in `source` into one Study; a bad file becomes an error entry, never an exception.

    Args:
        source: a file, a folder (searched recursively), or a list of files and folders.
        max_pixels: per-file pixel limit (see `read_dicom_file`).
    """
    study = Study()
    for path in _expand(source):
        try:
            images, result = read_dicom_file(path, max_pixels=max_pixels)
        except Exception as exc:  # a bug here must cost one file, not the study
            logger.exception("internal error reading %s", path)
            images, result = [], FileResult(file=str(path), status=STATUS_ERROR,
                                            reason=f"internal error in the reader ({type(exc).__name__})")
        level = logging.DEBUG if result.status == STATUS_OK else logging.INFO
        logger.log(level, "%s: %s (%s)", path, result.status, result.reason)
        study.images.extend(images)
        study.files.append(result)
    study.study_instance_uid = Study.common_study_uid(study.images)
    distinct = {im.study_instance_uid for im in study.images}
    if len(distinct) > 1:
        logger.warning("images belong to %d different studies; reporting the most common Study Instance UID",
                       len(distinct))
    return study


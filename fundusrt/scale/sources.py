"""Where the studies of a screening run come from: a folder tree, a CSV of paths, or a DICOMweb service.

Every source is a stream of `StudyRef`. Files are grouped into studies by the StudyInstanceUID of their
headers (read without the pixel data); the grouping goes through an SQLite index on disk, so a tree of
millions of files is walked once and never held in memory. A file or folder that cannot be a study (not
DICOM, no StudyInstanceUID, an empty folder, a CSV path that does not exist) becomes a StudyRef with its
`problem`, so that it is reported in the results like a failed study and the run goes on.
"""

from __future__ import annotations

import csv
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fundusrt.dicom.reader import quiet_pydicom

_INDEX_BATCH = 1000  # rows per SQLite transaction while indexing


class SourceError(ValueError):
    """The SOURCE of `fundusrt screen` cannot be used; the message says what was expected."""


@dataclass(frozen=True)
class StudyRef:
    """One unit of work: a study (its files, or its UID on a DICOMweb service), or an item that cannot be one.

    Attributes:
        key: what identifies it in the results table: the StudyInstanceUID, or ``file:PATH`` /
            ``folder:PATH`` for an item that is not a study.
        source: the folder, CSV or DICOMweb URL it came from.
        files: the study's files (folder and CSV sources).
        url: the DICOMweb service root (DICOMweb source); the study is fetched by WADO-RS.
        problem: why this item cannot be screened (no files are read for it).
    """

    key: str
    source: str
    files: tuple[str, ...] = ()
    url: str | None = None
    problem: str | None = None

    def to_row(self) -> dict[str, object]:
        """The row of this reference in a plan table (see `from_row`)."""
        return {"key": self.key, "source": self.source, "files": list(self.files), "url": self.url,
                "problem": self.problem}

    @classmethod
    def from_row(cls, row: dict[str, object]) -> StudyRef:
        """Inverse of `to_row`."""
        return cls(str(row["key"]), str(row["source"]), tuple(row.get("files") or ()), row.get("url"),
                   row.get("problem"))


def open_source(spec: str, index_path: Path, page_size: int = 500) -> Iterator[StudyRef]:
    """The studies named by SOURCE: an http(s) DICOMweb service root, a .csv file of paths, or a folder.

    Args:
        spec: the SOURCE argument.
        index_path: where the file index may be kept while grouping files into studies (rebuilt each call).
        page_size: studies per QIDO-RS page (DICOMweb source).

    Raises:
        SourceError: `spec` is none of these.
    """
    if spec.startswith(("http://", "https://")):
        return dicomweb_studies(spec, page_size)
    path = Path(spec)
    if path.is_dir():
        return group_by_study(_walk(path), str(path), index_path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return group_by_study(_csv_paths(path), str(path), index_path)
    raise SourceError(f"SOURCE {spec!r} is not a folder, a .csv file of paths, or a DICOMweb URL "
                      "(http:// or https://, the service root, e.g. http://pacs:8042/dicom-web)")


def dicomweb_studies(url: str, page_size: int = 500) -> Iterator[StudyRef]:
    """Every study the DICOMweb service lists (QIDO-RS, page by page)."""
    from fundusrt.dicom.dicomweb import connect, search_studies

    client = connect(url)
    for uid in search_studies(client, page_size):
        yield StudyRef(uid, url, url=url)


def _walk(root: Path) -> Iterator[Path | StudyRef]:
    """Files under `root` (links not followed, sorted per folder); an empty folder as a StudyRef."""
    for folder, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        if not dirs and not files:
            yield StudyRef(f"folder:{folder}", str(root), problem="empty folder: no DICOM files")
        for name in sorted(files):
            yield Path(folder) / name


def _csv_paths(csv_path: Path) -> Iterator[Path | StudyRef]:
    """Files named in a CSV (column ``path``, else the first; relative to the CSV's folder); folders walked."""
    with open(csv_path, newline="", encoding="utf-8-sig") as handle:
        rows = csv.reader(handle)
        header = next(rows, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        column = names.index("path") if "path" in names else 0
        if "path" not in names:  # no header row: the first line is a path too
            rows = _chain([header], rows)
        for line, row in enumerate(rows, 2 if "path" in names else 1):
            value = row[column].strip() if len(row) > column else ""
            if not value:
                continue
            path = Path(value) if Path(value).is_absolute() else csv_path.parent / value
            if path.is_dir():
                yield from _walk(path)
            elif path.is_file():
                yield path
            else:
                yield StudyRef(f"file:{path}", str(csv_path), problem=f"{csv_path.name} line {line}: no such file "
                                                                      "or folder")


def _chain(first: Iterable[list[str]], rest: Iterable[list[str]]) -> Iterator[list[str]]:
    yield from first
    yield from rest


def _study_uid(path: Path) -> str:
    """The StudyInstanceUID of a file, read without pixel data; ValueError saying why when there is none."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        with quiet_pydicom():
            ds = dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
            uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    except InvalidDicomError as exc:
        raise ValueError("not a DICOM file") from exc
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from exc
    except Exception as exc:  # the parser raises many types on corrupt headers
        raise ValueError(f"DICOM header is corrupt or truncated ({type(exc).__name__})") from exc
    if not uid:
        raise ValueError("DICOM file without a StudyInstanceUID")
    return uid


def group_by_study(items: Iterable[Path | StudyRef], source: str, index_path: Path) -> Iterator[StudyRef]:
    """Group files into studies by StudyInstanceUID through an on-disk index.

    Items that are already StudyRefs (problems found while listing) and files whose header cannot be
    read are passed on as they come; the studies follow, in StudyInstanceUID order, once every file
    has been indexed.
    """
    index_path.parent.mkdir(parents=True, exist_ok=True)
    index_path.unlink(missing_ok=True)
    db = sqlite3.connect(index_path)
    try:
        db.execute("CREATE TABLE files (study TEXT NOT NULL, path TEXT NOT NULL)")
        pending: list[tuple[str, str]] = []
        for item in items:
            if isinstance(item, StudyRef):
                yield item
                continue
            try:
                pending.append((_study_uid(item), str(item)))
            except ValueError as exc:
                yield StudyRef(f"file:{item}", source, problem=str(exc))
            if len(pending) >= _INDEX_BATCH:
                db.executemany("INSERT INTO files VALUES (?, ?)", pending)
                pending.clear()
        db.executemany("INSERT INTO files VALUES (?, ?)", pending)
        db.execute("CREATE INDEX by_study ON files (study, path)")
        study, files = None, []
        for uid, path in db.execute("SELECT study, path FROM files ORDER BY study, path"):
            if uid != study and study is not None:
                yield StudyRef(study, source, tuple(files))
                files = []
            study = uid
            files.append(path)
        if study is not None:
            yield StudyRef(study, source, tuple(files))
    finally:
        db.close()
        index_path.unlink(missing_ok=True)

"""What the reader hands to the rest of fundusrt: fundus images, per-file results, the study.

None of these objects hold protected health information: no patient name, ID, birth date,
accession number or institution; only UIDs (random, not identifying) and acquisition facts.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATUS_OK = "ok"
STATUS_REJECTED = "rejected"
STATUS_ERROR = "error"


@dataclass
class FundusImage:
    """One decoded fundus frame, RGB uint8 (H, W, 3), with the facts downstream code needs.

    Attributes:
        pixels: (rows, columns, 3) uint8 RGB.
        laterality: the value used: the header's "R"/"L", else the picture's (see laterality_source),
            else None.
        frame_index: 0-based frame of a multi-frame file (a stereo pair gives frames 0 and 1).
        device: "Manufacturer ModelName" as written by the modality, "" when absent.
        source: path of the file the frame came from.
        laterality_source: "tag" (the header said) or "image" (derived from the picture, no tag).
        image_laterality: what the picture shows: "R", "L" or "unknown" (fundusrt.dicom.laterality).
        image_laterality_confidence: 0-1.
        laterality_mismatch: the header and a confident picture disagree.
    """

    pixels: np.ndarray
    laterality: str | None
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    modality: str
    photometric_interpretation: str
    transfer_syntax_uid: str
    frame_index: int
    device: str
    rows: int
    columns: int
    source: str
    laterality_source: str = "tag"
    image_laterality: str = "unknown"
    image_laterality_confidence: float = 0.0
    laterality_mismatch: bool = False

    def __repr__(self) -> str:
        # The default repr would print the whole pixel array.
        return (f"FundusImage({self.columns}x{self.rows}, laterality={self.laterality!r}, "
                f"frame={self.frame_index}, sop={self.sop_instance_uid}, source={self.source!r})")


@dataclass
class FileResult:
    """What the reader did with one file.

    Attributes:
        status: "ok" (fundus image(s) decoded), "rejected" (valid DICOM but not a fundus
            photograph) or "error" (unreadable, corrupt or unsupported).
        reason: why it was rejected or failed; a short description of what was read when ok.
        frames: frames decoded (ok) or declared in the header (otherwise), 0 when unknown.
    """

    file: str
    status: str
    reason: str
    laterality: str | None = None
    rows: int = 0
    columns: int = 0
    frames: int = 0
    photometric_interpretation: str = ""
    transfer_syntax: str = ""
    sop_class: str = ""
    # the laterality check of the first frame (see FundusImage); laterality is the value used
    laterality_source: str = "tag"
    image_laterality: str = "unknown"
    image_laterality_confidence: float = 0.0
    laterality_mismatch: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (the `fundusrt study --json` entry)."""
        return dataclasses.asdict(self)


@dataclass
class Study:
    """Every fundus image found in a file, folder or list, and one result per file read."""

    images: list[FundusImage] = field(default_factory=list)
    files: list[FileResult] = field(default_factory=list)
    study_instance_uid: str | None = None

    def errors(self) -> list[FileResult]:
        """Results of files that were not loaded (status "rejected" or "error")."""
        return [r for r in self.files if r.status != STATUS_OK]

    @staticmethod
    def common_study_uid(images: list[FundusImage]) -> str | None:
        """The Study Instance UID most images share (ties: first seen), None without images."""
        if not images:
            return None
        return Counter(im.study_instance_uid for im in images).most_common(1)[0][0]

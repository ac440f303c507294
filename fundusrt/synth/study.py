"""A synthetic study: both eyes of one synthetic patient, 1-3 DICOM instances per eye, plus ground truth.

Each eye is drawn once (`fundusrt.synth.fundus`), and every instance of that eye is a capture of
the same picture in some variant and transfer syntax, so all instances of an eye share one
ground truth. A stereo pair's second frame is the first moved right by `STEREO_SHIFT` of the
width (black fill); its lesion boxes are those of frame 0.

`ground_truth.json` (beside the DICOM files):
    {"study_instance_uid", "seed", "patient_name", "patient_id",
     "instances": {SOP Instance UID: {GroundTruth.to_dict() fields..., "file", "laterality", "variant",
                                      "transfer_syntax", "sop_class_uid", "series_instance_uid",
                                      "frames", "stereo_shift_px"}}}
Everything (pictures, UIDs, file names, dates) is a function of the seed.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.uid import generate_uid

from fundusrt.manifest import atomic_write_text
from fundusrt.synth.dicom_writer import (
    OP_8BIT,
    SECONDARY_CAPTURE,
    TRANSFER_SYNTAXES,
    VARIANTS,
    VL_PHOTOGRAPHIC,
    write_op_image,
)
from fundusrt.synth.fundus import draw_fundus, random_case

GROUND_TRUTH_NAME = "ground_truth.json"
STEREO_SHIFT = 0.02
MAX_IMAGES_PER_EYE = 3
_BASE_TIME = datetime(2024, 1, 15, 9, 0, 0)


@dataclass
class StudyTruth:
    """What `write_study` wrote: the shared Study UID, the files and the per-instance ground truth."""

    study_instance_uid: str
    out_dir: Path
    ground_truth_path: Path
    seed: int
    patient_name: str
    patient_id: str
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def files(self) -> list[Path]:
        """The DICOM files, in writing order."""
        return [self.out_dir / entry["file"] for entry in self.instances.values()]

    def to_dict(self) -> dict[str, Any]:
        """The content of ground_truth.json."""
        return {"study_instance_uid": self.study_instance_uid, "seed": self.seed,
                "patient_name": self.patient_name, "patient_id": self.patient_id, "instances": self.instances}


def _uid(seed: int, *parts: object) -> str:
    # Derived, not random, so the same seed always writes the same study.
    return generate_uid(entropy_srcs=["fundusrt-synth", str(seed), *map(str, parts)])


def _stereo_pair(image: np.ndarray) -> tuple[np.ndarray, int]:
    shift = max(1, round(STEREO_SHIFT * image.shape[1]))
    second = np.zeros_like(image)
    second[:, shift:] = image[:, :-shift]
    return np.stack([image, second]), shift


def _check_choices(given: Sequence[str], allowed: Sequence[str], what: str) -> list[str]:
    chosen = list(given)
    unknown = [c for c in chosen if c not in allowed]
    if not chosen or unknown:
        raise ValueError(f"{what} must be a non-empty subset of {', '.join(allowed)}; got {chosen}")
    return chosen


def write_study(
    out_dir: str | Path,
    seed: int,
    *,
    variants: Sequence[str] = VARIANTS,
    transfer_syntaxes: Sequence[str] = tuple(TRANSFER_SYNTAXES),
    size: tuple[int, int] | None = None,
) -> StudyTruth:
    """Write one synthetic study (both eyes, 1-3 instances each, one Study UID) and its ground truth.

    Args:
        out_dir: folder to write into (created if missing).
        seed: non-negative int; everything written follows from it.
        variants: variants to draw from; each eye's first instance uses variants[0].
        transfer_syntaxes: syntaxes to draw from; each eye's first instance uses transfer_syntaxes[0].
        size: (width, height) of the pictures; None lets `random_case` pick a camera size.

    Raises:
        ValueError: a negative seed, or an unknown variant or transfer syntax.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    variants = _check_choices(variants, VARIANTS, "variants")
    transfer_syntaxes = _check_choices(transfer_syntaxes, tuple(TRANSFER_SYNTAXES), "transfer_syntaxes")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    width, height = size if size is not None else (None, None)
    truth = StudyTruth(study_instance_uid=_uid(seed, "study"), out_dir=out, ground_truth_path=out / GROUND_TRUTH_NAME,
                       seed=seed, patient_name=f"SYNTH^{seed:06d}", patient_id=f"SYNTH-{seed:06d}")
    frame_of_reference = _uid(seed, "sync")
    series: dict[tuple[str, str], tuple[str, int]] = {}
    instance_number = 0
    for eye_index, laterality in enumerate(("R", "L")):
        case = dataclasses.replace(random_case(2 * seed + eye_index, width, height), laterality=laterality)
        image, eye_truth = draw_fundus(case)
        count = int(rng.integers(1, MAX_IMAGES_PER_EYE + 1))
        for k in range(count):
            variant = variants[0] if k == 0 else str(rng.choice(variants))
            syntax = transfer_syntaxes[0] if k == 0 else str(rng.choice(transfer_syntaxes))
            sop_class = {"vl-photo": VL_PHOTOGRAPHIC, "sc": SECONDARY_CAPTURE}.get(variant, OP_8BIT)
            # One series per eye and SOP class: a series holds one modality and one kind of instance.
            key = (laterality, sop_class)
            if key not in series:
                series[key] = (_uid(seed, "series", *key), len(series) + 1)
            series_uid, series_number = series[key]
            pixels, shift = _stereo_pair(image) if variant == "op-stereo" else (image, 0)
            instance_number += 1
            sop_uid = _uid(seed, "instance", instance_number)
            name = f"{laterality}{k + 1}_{variant}_{syntax}.dcm"
            write_op_image(out / name, pixels, laterality=laterality, transfer_syntax=syntax, variant=variant,
                           study_instance_uid=truth.study_instance_uid, series_instance_uid=series_uid,
                           sop_instance_uid=sop_uid, frame_of_reference_uid=frame_of_reference,
                           series_number=series_number, instance_number=instance_number,
                           patient_name=truth.patient_name, patient_id=truth.patient_id,
                           acquired=_BASE_TIME + timedelta(days=seed % 3650, minutes=instance_number))
            truth.instances[sop_uid] = {
                **eye_truth.to_dict(), "file": name, "laterality": laterality, "variant": variant,
                "transfer_syntax": syntax, "sop_class_uid": str(sop_class), "series_instance_uid": series_uid,
                "frames": 2 if variant == "op-stereo" else 1, "stereo_shift_px": shift,
            }
    atomic_write_text(truth.ground_truth_path, json.dumps(truth.to_dict(), indent=2) + "\n")
    return truth

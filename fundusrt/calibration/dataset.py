"""Calibration sets: the tensors each component really sees, recorded by running the fp32 package.

Inputs come from the real pipeline, not placeholders: fundus images (DICOM studies or plain
image files) are decoded and tiled by `fundusrt.kernels.patchify`; the vision tower's fp32
outputs feed the connector; the decoder is fed the spliced image + text prompt embeddings
(prefill) and then its own KV states during a short greedy continuation (decode steps), so
activation ranges cover both phases and both modalities.

A set is cached on disk under a key made of the fp32 manifest's sha256, the sha256 of every
source file, the prompts and the recording settings: a rerun over the same inputs loads it
instead of running the model again. Each component's feeds are one `.npz` per sample and
`meta.json` is written last, so an interrupted recording is never mistaken for a complete one.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.dicom import read_dicom_file
from fundusrt.manifest import atomic_write_bytes, atomic_write_text, sha256_file
from fundusrt.synth.grading import DR_GRADE_NAMES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
QUANTISED_COMPONENTS = ("vision", "connector", "decoder")
CACHE_FORMAT = 1
OPTION_LETTERS = "ABCDEFGH"


class CalibrationError(ValueError):
    """Calibration inputs are unusable (no images, unreadable prompts file, bad settings)."""


@dataclass(frozen=True)
class Prompt:
    """A question; with `options` it is a multiple-choice question answered by one option letter."""

    question: str
    options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise CalibrationError("a prompt has an empty question")
        if self.options and not 2 <= len(self.options) <= len(OPTION_LETTERS):
            raise CalibrationError(f"a multiple-choice prompt needs 2..{len(OPTION_LETTERS)} options, "
                                   f"got {len(self.options)} for {self.question!r}")

    @property
    def letters(self) -> str:
        """The option letters of a multiple-choice prompt ("" for an open question)."""
        return OPTION_LETTERS[:len(self.options)]

    def text(self) -> str:
        """The user text sent to the model (options listed one per line, VLMEvalKit style)."""
        if not self.options:
            return self.question
        lines = [self.question] + [f"{letter}. {option}" for letter, option in zip(self.letters, self.options,
                                                                                    strict=True)]
        return "\n".join(lines + ["Answer with the option's letter from the given choices directly."])


# Asked when no prompts file is given, next to the package's own default questions.
DEFAULT_MCQS = (
    Prompt("What is the diabetic retinopathy grade of this eye?", tuple(DR_GRADE_NAMES)),
    Prompt("Which eye is shown in this fundus photograph?", ("Right eye", "Left eye")),
    Prompt("Is there referable diabetic retinopathy?", ("Yes", "No")),
    Prompt("Are drusen of age-related macular degeneration present?", ("Yes", "No")),
)


@dataclass
class SourceImage:
    """A decoded RGB uint8 image and where it came from."""

    source: str
    pixels: np.ndarray


def source_files(sources: Sequence[str | Path]) -> list[Path]:
    """Files named by `sources` (files, or folders searched recursively in sorted order; hidden files,
    DICOMDIR and JSON side files such as ground_truth.json are skipped)."""
    files: list[Path] = []
    for entry in sources:
        path = Path(entry)
        if path.is_dir():
            for root, dirs, names in os.walk(path, followlinks=False):
                dirs.sort()
                files.extend(Path(root) / n for n in sorted(names) if not n.startswith(".") and n != "DICOMDIR"
                             and not n.endswith(".json"))
        elif path.is_file():
            files.append(path)
        else:
            raise CalibrationError(f"calibration source {path} does not exist; pass DICOM files, study folders "
                                   "or image files")
    return files


def _read_image_file(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8)


def iter_source_images(files: Sequence[Path]) -> Iterator[SourceImage | tuple[str, str]]:
    """Decode each file: yield SourceImage per fundus image, or (file, reason) for a file that gave none."""
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            try:
                yield SourceImage(str(path), _read_image_file(path))
            except (OSError, ValueError) as exc:
                yield str(path), f"unreadable image file ({exc})"
            continue
        images, result = read_dicom_file(path)
        if not images:
            yield str(path), f"{result.status}: {result.reason}"
        for image in images:
            yield SourceImage(f"{path}#{image.frame_index}", image.pixels)


def load_prompts(path: str | Path | None, default_questions: Sequence[str]) -> list[Prompt]:
    """Prompts from a file, else the package's default questions plus DEFAULT_MCQS.

    The file is either JSON (a list whose items are a question string or
    {"question": str, "options": [str, ...]}) or text with one open question per line.
    """
    if path is None:
        return [Prompt(q) for q in default_questions] + list(DEFAULT_MCQS)
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read the prompts file {path}: {exc}") from exc
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"prompts file {path} is not valid JSON: {exc}") from exc
        if not isinstance(items, list):
            raise CalibrationError(f"prompts file {path} must hold a JSON list of questions")
        prompts = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                prompts.append(Prompt(item))
            elif isinstance(item, dict) and isinstance(item.get("question"), str):
                prompts.append(Prompt(item["question"], tuple(str(o) for o in item.get("options", ()))))
            else:
                raise CalibrationError(f"prompts file {path} item {i} must be a string or "
                                       '{"question": ..., "options": [...]}')
    else:
        prompts = [Prompt(line.strip()) for line in text.splitlines() if line.strip()]
    if not prompts:
        raise CalibrationError(f"prompts file {path} holds no questions")
    return prompts


@dataclass
class CalibrationSet:
    """Recorded feeds per component (name -> array dicts, in recording order)."""

    feeds: dict[str, list[dict[str, np.ndarray]]]
    key: str
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        """Write every feed as .npz, then meta.json (the completeness marker)."""
        directory.mkdir(parents=True, exist_ok=True)
        for component, feeds in self.feeds.items():
            (directory / component).mkdir(exist_ok=True)
            for i, feed in enumerate(feeds):
                buffer = io.BytesIO()
                np.savez(buffer, **feed)
                atomic_write_bytes(directory / component / f"{i:05d}.npz", buffer.getvalue())
        meta = {"format": CACHE_FORMAT, "key": self.key, "info": self.info,
                "counts": {c: len(f) for c, f in self.feeds.items()}}
        atomic_write_text(directory / "meta.json", json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path, key: str) -> CalibrationSet | None:
        """The set cached in `directory` under `key`, or None when absent, incomplete or stale."""
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
            return None
        feeds: dict[str, list[dict[str, np.ndarray]]] = {}
        for component, count in meta["counts"].items():
            feeds[component] = []
            for i in range(count):
                try:
                    with np.load(directory / component / f"{i:05d}.npz") as data:
                        feeds[component].append({name: data[name] for name in data.files})
                except (OSError, ValueError):
                    return None
        return cls(feeds=feeds, key=key, info=meta.get("info", {}))


def calibration_key(manifest_sha256: str, files: Sequence[Path], prompts: Sequence[Prompt],
                    settings: dict[str, Any]) -> str:
    """Identity of a calibration set: same package, same file contents, same prompts and settings."""
    payload = {
        "format": CACHE_FORMAT, "manifest": manifest_sha256, "settings": settings,
        "files": [sha256_file(f) for f in files],
        "prompts": [[p.question, list(p.options)] for p in prompts],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

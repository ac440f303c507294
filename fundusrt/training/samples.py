"""Records -> training samples: images through the runtime's own preprocessing, conversations into ids
with labels on assistant tokens only, tiles cached as .npy, and batches.

Train/serve identity: tiles come from `fundusrt.kernels.patchify` with the model's TilingConfig and the
first turn from `fundusrt.prompt.build_input_ids`, the exact calls the runtime Pipeline makes.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fundusrt.config import TilingConfig
from fundusrt.kernels import patchify
from fundusrt.manifest import PromptSpec, atomic_write_bytes
from fundusrt.prompt import PromptError, TokenizerLike, build_input_ids
from fundusrt.training.records import DataError, DataIssue, Record, read_records

if TYPE_CHECKING:
    import torch

IGNORE_INDEX = -100
DICOM_MAGIC = b"DICM"


@dataclass
class Encoded:
    """Token ids of a whole conversation and its labels (IGNORE_INDEX outside assistant answers)."""

    input_ids: np.ndarray
    labels: np.ndarray


def load_image(path: Path) -> np.ndarray:
    """An image file or a DICOM file (told apart by the DICM magic) as RGB uint8 (H, W, 3).

    Raises:
        ValueError: the file cannot be decoded; the message says why.
    """
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == DICOM_MAGIC:
        from fundusrt.dicom import read_study

        study = read_study(path)
        if not study.images:
            reasons = "; ".join(f"{e.status}: {e.reason}" for e in study.errors()) or "no fundus image in it"
            raise ValueError(f"unreadable DICOM: {reasons}")
        return study.images[0].pixels
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"unreadable image: {exc}") from exc


def encode_conversation(
    spec: PromptSpec,
    tokenizer: TokenizerLike,
    turns: Sequence[tuple[str, str]],
    image_token_counts: Sequence[int],
    system_message: str | None = None,
) -> Encoded:
    """Ids and labels of a multi-turn conversation in the package's chat format.

    The first turn's prompt is `build_input_ids` (as served); each answer is followed by the turn end
    of the template (ChatML: `<|im_end|>\\n`). Labels cover the answer and the turn end up to its stop
    token, so the model learns to stop; everything else is IGNORE_INDEX.
    """
    turn_end = spec.user_template.split("{content}", 1)[1]
    end_ids = list(tokenizer.encode(turn_end, add_special_tokens=False).ids)  # type: ignore[attr-defined]
    stops = [i for i, token in enumerate(end_ids) if token in spec.stop_token_ids]
    labelled_end = stops[0] + 1 if stops else len(end_ids)
    ids: list[int] = []
    labels: list[int] = []
    for index, (question, answer) in enumerate(turns):
        if index == 0:
            prompt = build_input_ids(spec, tokenizer, question, image_token_counts, system_message).tolist()
        else:
            text = spec.user_template.format(content=question) + spec.assistant_prefix
            prompt = list(tokenizer.encode(text, add_special_tokens=False).ids)  # type: ignore[attr-defined]
        answer_ids = list(tokenizer.encode(answer, add_special_tokens=False).ids)  # type: ignore[attr-defined]
        ids += prompt + answer_ids + end_ids
        labels += ([IGNORE_INDEX] * len(prompt) + answer_ids + end_ids[:labelled_end]
                   + [IGNORE_INDEX] * (len(end_ids) - labelled_end))
    return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64))


def _cache_key(path: Path, tiling: TilingConfig) -> str:
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_mtime_ns, stat.st_size, tiling.to_dict()], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()


def cached_tiles(path: Path, tiling: TilingConfig, cache_dir: Path) -> Path:
    """The .npy file of `patchify(load_image(path), tiling)`'s pixel values, computed on first use."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{_cache_key(path, tiling)}.npy"
    if not target.is_file():
        buffer = io.BytesIO()
        np.save(buffer, patchify(load_image(path), tiling).pixel_values)
        atomic_write_bytes(target, buffer.getvalue())
    return target


@dataclass
class Sample:
    """A prepared training sample: cached tiles (one file per image) and the encoded conversation."""

    where: str
    tile_files: list[Path]
    input_ids: np.ndarray
    labels: np.ndarray
    turns: tuple[tuple[str, str], ...] = ()
    image_files: tuple[Path, ...] = ()  # the source images of tile_files, in the same order

    def pixel_values(self) -> np.ndarray:
        """(total tiles, 3, S, S) of all the sample's images, in order."""
        return np.concatenate([np.load(f) for f in self.tile_files]) if self.tile_files else np.zeros((0,))


def prepare_record(record: Record, spec: PromptSpec, tokenizer: TokenizerLike, tiling: TilingConfig,
                   max_seq_len: int, cache_dir: Path) -> Sample | DataIssue:
    """Preprocess and encode one record, or the issue that makes it unusable."""
    def issue(reason: str) -> DataIssue:
        return DataIssue(record.file, record.line, reason)

    tile_files, counts = [], []
    for image in record.images:
        try:
            tile_file = cached_tiles(image, tiling, cache_dir)
        except (OSError, ValueError) as exc:
            return issue(f"image {image}: {exc}")
        tile_files.append(tile_file)
        counts.append(int(np.load(tile_file, mmap_mode="r").shape[0]) * spec.tokens_per_tile)
    try:
        encoded = encode_conversation(spec, tokenizer, record.turns, counts, record.system)
    except PromptError as exc:
        return issue(str(exc))
    if len(encoded.input_ids) > max_seq_len:
        return issue(f"the sequence is {len(encoded.input_ids)} tokens, over the context length {max_seq_len} "
                     f"({sum(counts)} image tokens); shorten the conversation or raise data.max_seq_len")
    return Sample(record.where, tile_files, encoded.input_ids, encoded.labels, tuple(record.turns),
                  tuple(record.images))


def prepare_samples(
    files: Sequence[str | Path],
    spec: PromptSpec,
    tokenizer: TokenizerLike,
    tiling: TilingConfig,
    *,
    max_seq_len: int,
    cache_dir: Path,
    image_root: str | Path | None = None,
    on_issue: Callable[[DataIssue], None] | None = None,
) -> tuple[list[Sample], list[DataIssue]]:
    """All usable samples of `files` and the issues of the others (each also passed to `on_issue`)."""
    samples: list[Sample] = []
    issues: list[DataIssue] = []
    report = on_issue or (lambda issue: print(f"bad sample: {issue}", file=sys.stderr))
    for file in files:
        for item in read_records(file, image_root):
            if isinstance(item, Record):
                item = prepare_record(item, spec, tokenizer, tiling, max_seq_len, cache_dir)
            if isinstance(item, DataIssue):
                issues.append(item)
                report(item)
            else:
                samples.append(item)
    return samples, issues


def apply_bad_sample_policy(samples: Sequence[Sample], issues: Sequence[DataIssue], policy: str,
                            max_bad_fraction: float) -> None:
    """Raise DataError when the policy says the data cannot be trained on.

    "error": any bad sample stops the run (naming the first). "skip": bad samples are left out,
    unless they exceed `max_bad_fraction` of all records or nothing usable is left.
    """
    total = len(samples) + len(issues)
    if issues and policy == "error":
        raise DataError(f"bad sample (data.on_bad_sample is 'error'): {issues[0]}"
                        + (f" and {len(issues) - 1} more" if len(issues) > 1 else ""))
    if not samples:
        raise DataError(f"no usable samples among {total} records" + (f"; first problem: {issues[0]}" if issues else ""))
    if len(issues) > max_bad_fraction * total:
        raise DataError(f"{len(issues)} of {total} records are bad, more than data.max_bad_fraction="
                        f"{max_bad_fraction}; first: {issues[0]}")


@dataclass
class Batch:
    """Right-padded ids, labels and attention mask (batch, seq) and the concatenated tiles of all images."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None
    where: list[str]

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(items: Sequence[tuple[Sample, np.ndarray]], pad_token_id: int) -> Batch:
    """Batch samples with their loaded pixel values (sample order = order of the image features)."""
    import torch

    length = max(len(s.input_ids) for s, _ in items)
    ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    for row, (sample, _) in enumerate(items):
        n = len(sample.input_ids)
        ids[row, :n] = torch.from_numpy(sample.input_ids)
        labels[row, :n] = torch.from_numpy(sample.labels)
        mask[row, :n] = 1
    pixels = [p for _, p in items if p.size]
    pixel_values = torch.from_numpy(np.concatenate(pixels)) if pixels else None
    return Batch(ids, labels, mask, pixel_values, [s.where for s, _ in items])


__all__ = [
    "Batch",
    "DataError",
    "DataIssue",
    "Encoded",
    "Sample",
    "apply_bad_sample_policy",
    "cached_tiles",
    "collate",
    "encode_conversation",
    "load_image",
    "prepare_record",
    "prepare_samples",
]

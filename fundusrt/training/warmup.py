"""Vision warm-up: train the tower and connector on what the data says about the pixels before the LLM learns to read them.

A vision tower trained from scratch together with the decoder tends to stall at the answer priors: the
decoder cannot use features that do not yet exist, and the tower gets no useful gradient from a decoder
that ignores it. Warm-up gives the tower a direct signal first, on the connector's output tokens (the
very tokens the decoder will read):

- each closed question of the data (one with few distinct answers, e.g. "Which eye is this?" ->
  Right/Left) gets a small attention-pooling probe, trained on cross-entropy of the answers;
- each grounding question (answered with InternVL `<ref>label</ref><box>[[x1,y1,x2,y2], ...]</box>`,
  0-999 image coordinates, or with no box at all) gets a per-token classifier: a token is positive
  where its square of the tile overlaps a box. A 2-pixel haemorrhage gives an image-level answer
  almost no gradient to find it by; the boxes say where to look.

Tower, connector, probes and token classifiers train together; probes and classifiers are then discarded.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fundusrt.kernels import TilePlan, plan_image
from fundusrt.models.lvlm import LVLM
from fundusrt.training.samples import Sample, load_image

# a question whose answers take at most this many values is a classification target
MAX_ANSWERS = 8
# and it must be asked of at least this fraction of the images
MIN_COVERAGE = 0.2
# a grounding question is asked of few images (often one target per image), so a count suffices
MIN_GROUNDING_SAMPLES = 8
# positives are rare (a lesion covers a token or two): weight them up to this many negatives
MAX_POS_WEIGHT = 50.0
_BOX = re.compile(r"\[\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\]")


class _AttentionProbe(nn.Module):
    """A learned query attending over the image tokens, then a linear classifier."""

    def __init__(self, hidden: int, num_classes: int) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        heads = next(h for h in (4, 2, 1) if hidden % h == 0)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.classify = nn.Linear(hidden, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled, _ = self.attention(self.query.expand(len(tokens), -1, -1), tokens, tokens)
        return self.classify(pooled[:, 0])


def closed_questions(samples: Sequence[Sample]) -> dict[str, list[str]]:
    """Questions (without image placeholders) asked of enough images, with their few sorted answers."""
    answers: dict[str, Counter[str]] = {}
    asked: dict[str, set[object]] = {}
    images: set[object] = set()
    for index, sample in enumerate(samples):
        # coverage counts images, not samples: data asking one question per sample repeats each image
        image = tuple(sample.tile_files) or index
        images.add(image)
        for question, answer in sample.turns:
            answers.setdefault(_plain(question), Counter())[answer.strip()] += 1
            asked.setdefault(_plain(question), set()).add(image)
    return {q: sorted(c) for q, c in answers.items()
            if 2 <= len(c) <= MAX_ANSWERS and len(asked[q]) >= MIN_COVERAGE * len(images)}


def grounding_questions(samples: Sequence[Sample]) -> list[str]:
    """Questions (without image placeholders) answered with `<box>` grounding in enough samples, sorted."""
    counts = Counter(_plain(q) for sample in samples for q, a in sample.turns if "<box>" in a)
    return sorted(q for q, n in counts.items() if n >= MIN_GROUNDING_SAMPLES)


def parse_boxes(answer: str) -> list[tuple[int, int, int, int]]:
    """The 0-999 boxes of a grounding answer (`...<box>[[x1,y1,x2,y2], ...]</box>`); [] when it has none."""
    if "<box>" not in answer:
        return []
    return [(int(a), int(b), int(c), int(d)) for a, b, c, d in _BOX.findall(answer.split("<box>", 1)[1])]


def token_targets(plan: TilePlan, image_size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]],
                  grid: int) -> np.ndarray:
    """(num_tiles * grid * grid,) float32: 1 for each token whose square of its tile overlaps a box.

    Args:
        plan: the image's TilePlan (ROI crop, per-tile resize and crop boxes).
        image_size: (width, height) of the image the 0-999 coordinates refer to.
        boxes: InternVL boxes (x1, y1, x2, y2), 0-999 of the image width/height, corners inclusive.
        grid: tokens per tile side (the connector keeps the patch grid: square, row-major).
    """
    width, height = image_size
    rx, ry = plan.roi[:2] if plan.roi is not None else (0, 0)
    source_w, source_h = plan.source_size
    cell = plan.tile_size / grid
    out = np.zeros((plan.num_tiles, grid, grid), np.float32)
    for index, tile in enumerate(plan.tiles):
        fx, fy = tile.resize_to[0] / source_w, tile.resize_to[1] / source_h
        ox, oy = tile.paste_at[0] - tile.box[0], tile.paste_at[1] - tile.box[1]
        for x1, y1, x2, y2 in boxes:
            # 0-999 -> image pixels (the end corner is the last pixel, hence +1) -> tile pixels -> cells
            left, right = (x1 / 999 * width - rx) * fx + ox, (x2 / 999 * width + 1 - rx) * fx + ox
            top, bottom = (y1 / 999 * height - ry) * fy + oy, (y2 / 999 * height + 1 - ry) * fy + oy
            c0, c1 = max(0, math.floor(left / cell)), min(grid, math.ceil(right / cell))
            r0, r1 = max(0, math.floor(top / cell)), min(grid, math.ceil(bottom / cell))
            if c0 < c1 and r0 < r1:
                out[index, r0:r1, c0:c1] = 1.0
    return out.reshape(-1)


def _plain(question: str) -> str:
    return question.replace("<image>", "").strip()


def _dense_targets(model: LVLM, files: list[Path], sources: dict[Path, Path],
                   boxes: dict[Path, dict[str, list[tuple[int, int, int, int]]]], questions: list[str],
                   tiles: int) -> np.ndarray:
    """(images, tokens, questions): 1/0 where a grounding question was asked of the image, -1 elsewhere."""
    tokens = model.config.tokens_per_tile
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"grounding warm-up needs a square token grid per tile; this connector gives {tokens} tokens")
    out = np.full((len(files), tiles * tokens, len(questions)), -1.0, np.float32)
    for index, file in enumerate(files):
        if file not in boxes:
            continue
        image = load_image(sources[file])
        plan = plan_image(image, model.config.tiling)
        for k, question in enumerate(questions):
            if question in boxes[file]:
                out[index, :, k] = token_targets(plan, (image.shape[1], image.shape[0]), boxes[file][question], grid)
    return out


def warm_up_vision(model: LVLM, samples: Sequence[Sample], *, steps: int, batch_size: int, lr: float, seed: int,
                   device: torch.device, log: Callable[[str], None]) -> dict[str, float]:
    """Train `model.vision` and `model.connector` through probes for `steps` steps (on single-image samples).

    The learning rate follows a cosine from `lr` down to 5% of it.

    Returns:
        the final training accuracy of each closed question's probe and, for each grounding question,
        the recall of its token classifier on positive tokens (a quick check that the tower learned).
    """
    questions = closed_questions(samples)
    grounded = grounding_questions(samples)
    if not questions and not grounded:
        raise ValueError("vision warm-up found no closed question (one with 2..8 distinct answers asked in at "
                         f"least {MIN_COVERAGE:.0%} of the images) and no grounding question; set "
                         "vision_warmup_steps to 0")
    # one target row per image: the answers of all samples showing it (data often asks one question per sample)
    images: dict[Path, dict[str, str]] = {}
    boxes: dict[Path, dict[str, list[tuple[int, int, int, int]]]] = {}
    sources: dict[Path, Path] = {}
    for sample in samples:
        if len(sample.tile_files) == 1:
            file = sample.tile_files[0]
            answers = images.setdefault(file, {})
            answers.update({_plain(q): a.strip() for q, a in sample.turns if _plain(q) in questions})
            found = {_plain(q): parse_boxes(a) for q, a in sample.turns if _plain(q) in grounded}
            if found and sample.image_files:
                boxes.setdefault(file, {}).update(found)
                sources[file] = sample.image_files[0]
    files = list(images)
    # a batch is split back into images by token count, so every image must have as many tiles
    tiles = {int(np.load(f, mmap_mode="r").shape[0]) for f in files}
    if len(tiles) > 1:
        raise ValueError(f"vision warm-up needs one tile count for every image; the data gives {sorted(tiles)} "
                         "tiles (use a fixed tiling such as 'single', or set vision_warmup_steps to 0)")
    targets = {q: np.array([a.index(images[f][q]) if q in images[f] else -1 for f in files]) for q, a in questions.items()}
    dense = _dense_targets(model, files, sources, boxes, grounded, tiles.pop()) if boxes else None
    hidden = model.config.text.hidden_size
    probes = nn.ModuleDict({str(k): _AttentionProbe(hidden, len(a)) for k, a in enumerate(questions.values())})
    locate = nn.Linear(hidden, max(1, len(grounded)))
    probes.to(device)
    locate.to(device)
    pos_weight = None
    if dense is not None:
        positives, negatives = (dense == 1).sum(axis=(0, 1)), (dense == 0).sum(axis=(0, 1))
        weight = np.clip(negatives / np.maximum(positives, 1), 1.0, MAX_POS_WEIGHT)
        pos_weight = torch.from_numpy(weight.astype(np.float32)).to(device)
    parts = [*model.vision.parameters(), *model.connector.parameters()]
    trainable = [p.requires_grad for p in parts]
    for p in parts:  # also when the main loop keeps them frozen
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*parts, *probes.parameters(), *locate.parameters()], lr=lr)
    rng = np.random.default_rng([seed, 1])
    hits: dict[str, list[float]] = {q: [] for q in [*questions, *grounded]}
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        index = rng.choice(len(files), size=min(batch_size, len(files)), replace=False)
        pixels = torch.from_numpy(np.concatenate([np.load(files[i]) for i in index])).to(device)
        tokens = model.image_embeds(pixels).reshape(len(index), -1, hidden)
        loss = torch.zeros((), device=device)
        for k, question in enumerate(questions):
            y = torch.from_numpy(targets[question][index]).to(device)
            asked = y >= 0
            if asked.any():
                logits = probes[str(k)](tokens[asked])
                loss = loss + F.cross_entropy(logits, y[asked])
                hits[question].append(float((logits.argmax(-1) == y[asked]).float().mean()))
        if dense is not None:
            y = torch.from_numpy(dense[index]).to(device)
            known = y >= 0
            if known.any():
                logits = locate(tokens)
                per_token = F.binary_cross_entropy_with_logits(logits, y.clamp(min=0), pos_weight=pos_weight,
                                                               reduction="none")
                loss = loss + per_token[known].mean()
                for k, question in enumerate(grounded):
                    positive = y[..., k] == 1
                    if positive.any():
                        hits[question].append(float((logits[..., k][positive] > 0).float().mean()))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"vision warm-up {step + 1}/{steps}  probe loss {loss.item():.4f}")
    for p, flag in zip(parts, trainable, strict=True):
        p.requires_grad_(flag)
    accuracy = {q: float(np.mean(h[-20:])) for q, h in hits.items() if h}
    log("vision warm-up probe accuracy / token recall (last 20 batches): "
        + ", ".join(f"{q!r} {a:.2f}" for q, a in accuracy.items()))
    return accuracy

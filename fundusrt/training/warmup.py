"""Vision warm-up: train the tower and connector on the data's closed questions before the LLM learns to read them.

A vision tower trained from scratch together with the decoder tends to stall at the answer priors: the
decoder cannot use features that do not yet exist, and the tower gets no useful gradient from a decoder
that ignores it. Warm-up gives the tower a direct signal first. Each closed question of the data (one
with few distinct answers, e.g. "Which eye is this?" -> Right/Left) gets a small attention-pooling
probe over the connector's output tokens, the very tokens the decoder will read; tower, connector and
probes are trained on cross-entropy of the answers, then the probes are discarded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fundusrt.models.lvlm import LVLM
from fundusrt.training.samples import Sample

# a question whose answers take at most this many values is a classification target
MAX_ANSWERS = 8
# and it must be asked in at least this fraction of the samples
MIN_COVERAGE = 0.2


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
    """Questions (without image placeholders) asked often enough, with their few sorted answers."""
    answers: dict[str, Counter[str]] = {}
    for sample in samples:
        for question, answer in sample.turns:
            answers.setdefault(_plain(question), Counter())[answer.strip()] += 1
    return {q: sorted(c) for q, c in answers.items()
            if 2 <= len(c) <= MAX_ANSWERS and sum(c.values()) >= MIN_COVERAGE * len(samples)}


def _plain(question: str) -> str:
    return question.replace("<image>", "").strip()


def warm_up_vision(model: LVLM, samples: Sequence[Sample], *, steps: int, batch_size: int, lr: float, seed: int,
                   device: torch.device, log: Callable[[str], None]) -> dict[str, float]:
    """Train `model.vision` and `model.connector` through probes for `steps` steps (on single-image samples).

    Returns:
        the final training accuracy of each probe's question (a quick check that the tower learned).
    """
    questions = closed_questions(samples)
    if not questions:
        raise ValueError("vision warm-up found no closed question (one with 2..8 distinct answers asked in at "
                         f"least {MIN_COVERAGE:.0%} of the samples); set vision_warmup_steps to 0")
    # one target row per image: the answers of all samples showing it (data often asks one question per sample)
    images: dict[Path, dict[str, str]] = {}
    for sample in samples:
        if len(sample.tile_files) == 1:
            answers = images.setdefault(sample.tile_files[0], {})
            answers.update({_plain(q): a.strip() for q, a in sample.turns if _plain(q) in questions})
    files = list(images)
    targets = {q: np.array([a.index(images[f][q]) if q in images[f] else -1 for f in files]) for q, a in questions.items()}
    hidden = model.config.text.hidden_size
    probes = nn.ModuleDict({str(k): _AttentionProbe(hidden, len(a)) for k, a in enumerate(questions.values())})
    probes.to(device)
    parts = [*model.vision.parameters(), *model.connector.parameters()]
    trainable = [p.requires_grad for p in parts]
    for p in parts:  # also when the main loop keeps them frozen
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*parts, *probes.parameters()], lr=lr)
    rng = np.random.default_rng([seed, 1])
    hits: dict[str, list[float]] = {q: [] for q in questions}
    model.train()
    for step in range(steps):
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
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"vision warm-up {step + 1}/{steps}  probe loss {loss.item():.4f}")
    for p, flag in zip(parts, trainable, strict=True):
        p.requires_grad_(flag)
    accuracy = {q: float(np.mean(h[-20:])) for q, h in hits.items() if h}
    log("vision warm-up probe accuracy (last 20 batches): "
        + ", ".join(f"{q!r} {a:.2f}" for q, a in accuracy.items()))
    return accuracy

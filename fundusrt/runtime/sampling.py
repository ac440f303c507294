"""Token samplers: pure logit transforms and a factory that composes them (after mlx-lm `make_sampler`).

The transforms follow transformers' logits processors so that a package sampled here and the
PyTorch reference sampled with `generate()` agree: repetition penalty first, then temperature,
top-k and top-p, each on the previous one's output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fundusrt.config import GenerationConfig

# A sampler maps the last position's logits (vocab,) and the ids so far (prompt + generated) to the next id.
Sampler = Callable[[np.ndarray, Sequence[int]], int]


def apply_repetition_penalty(logits: np.ndarray, token_ids: Sequence[int], penalty: float) -> np.ndarray:
    """Penalise every id in `token_ids` once, as transformers' RepetitionPenaltyLogitsProcessor does.

    A seen token's logit is divided by `penalty` when positive and multiplied by it when negative,
    so `penalty > 1` always makes repeats less likely.
    """
    if penalty == 1.0 or len(token_ids) == 0:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(token_ids, dtype=np.int64))
    values = out[seen]
    out[seen] = np.where(values < 0, values * penalty, values / penalty)
    return out


def top_k_mask(logits: np.ndarray, k: int) -> np.ndarray:
    """Set every logit below the k-th largest to -inf (ties with the k-th are kept); k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k)[-k]
    return np.where(logits < kth, -np.inf, logits)


def top_p_mask(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: drop the least likely tokens whose total probability is at most 1 - p.

    Same rule as transformers' TopPLogitsWarper (ascending sort, cumulative softmax, remove where
    the cumulative probability <= 1 - p, always keep the most likely token).
    """
    if p >= 1.0:
        return logits
    order = np.argsort(logits, kind="stable")
    cumulative = np.cumsum(softmax(logits[order]))
    remove_sorted = cumulative <= 1.0 - p
    remove_sorted[-1] = False
    remove = np.empty_like(remove_sorted)
    remove[order] = remove_sorted
    return np.where(remove, -np.inf, logits)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (-inf entries get probability 0)."""
    shifted = logits - np.max(logits, axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / np.sum(exp, axis=-1, keepdims=True)


def make_sampler(
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
) -> Sampler:
    """Build a sampler; greedy (argmax after the repetition penalty) when `temperature` is 0.

    Args:
        temperature: softmax temperature; 0 means greedy.
        top_k: keep only the k most likely tokens (0: all).
        top_p: nucleus probability mass to keep (1: all).
        repetition_penalty: transformers-style penalty on ids already seen (1: none).
        seed: seeds the sampler's own numpy Generator, so equal seeds give equal samples.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")

    if temperature == 0:
        def greedy(logits: np.ndarray, token_ids: Sequence[int]) -> int:
            return int(np.argmax(apply_repetition_penalty(logits, token_ids, repetition_penalty)))

        return greedy

    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray, token_ids: Sequence[int]) -> int:
        scores = apply_repetition_penalty(logits, token_ids, repetition_penalty).astype(np.float64) / temperature
        scores = top_p_mask(top_k_mask(scores, top_k), top_p)
        cumulative = np.cumsum(softmax(scores))
        # Inverse-CDF draw: one uniform per token keeps a seeded run reproducible across numpy versions.
        index = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
        return min(index, len(cumulative) - 1)

    return sample


def sampler_from_config(gen: GenerationConfig) -> Sampler:
    """The sampler a GenerationConfig describes."""
    return make_sampler(gen.temperature, gen.top_k, gen.top_p, gen.repetition_penalty, gen.seed)

"""Sampler transforms against transformers' own logits processors and direct numpy formulas.

The transformers comparisons skip on a runtime-only install (no torch); the numpy ones always run.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from fundusrt.config import GenerationConfig
from fundusrt.runtime.sampling import (
    apply_repetition_penalty,
    make_sampler,
    sampler_from_config,
    softmax,
    top_k_mask,
    top_p_mask,
)

VOCAB = 257


def _logits(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * 3).astype(np.float32)


@pytest.fixture(scope="module")
def hf() -> SimpleNamespace:
    """transformers' logits processors (`hf.lp`) and `hf.apply(processor, logits, ids)` on numpy logits."""
    torch = pytest.importorskip("torch")
    logits_process = pytest.importorskip("transformers.generation.logits_process")

    def apply(processor, logits: np.ndarray, ids: list[int] | None = None) -> np.ndarray:
        input_ids = torch.tensor([ids or [0]], dtype=torch.long)
        return processor(input_ids, torch.from_numpy(logits.copy())[None]).numpy()[0]

    return SimpleNamespace(lp=logits_process, apply=apply)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("penalty", [0.7, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(hf: SimpleNamespace, seed: int, penalty: float) -> None:
    logits = _logits(seed)
    ids = np.random.default_rng(seed + 100).integers(0, VOCAB, 40).tolist()  # with repeats
    ours = apply_repetition_penalty(logits, ids, penalty)
    theirs = hf.apply(hf.lp.RepetitionPenaltyLogitsProcessor(penalty), logits, ids)
    np.testing.assert_array_equal(ours, theirs)
    untouched = np.setdiff1d(np.arange(VOCAB), ids)
    np.testing.assert_array_equal(ours[untouched], logits[untouched])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 5, 50, VOCAB + 3])
def test_top_k_matches_transformers_and_formula(hf: SimpleNamespace, seed: int, k: int) -> None:
    logits = _logits(seed)
    ours = top_k_mask(logits, k)
    theirs = hf.apply(hf.lp.TopKLogitsWarper(k), logits)
    np.testing.assert_array_equal(ours, theirs)
    kept = set(np.flatnonzero(np.isfinite(ours)))
    assert kept == set(np.argsort(-logits)[:k].tolist())


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("p", [0.05, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers_and_formula(hf: SimpleNamespace, seed: int, p: float) -> None:
    logits = _logits(seed)
    ours = top_p_mask(logits, p)
    theirs = hf.apply(hf.lp.TopPLogitsWarper(p), logits)
    np.testing.assert_array_equal(ours, theirs)
    # Direct rule: keep a token when the mass of the tokens more likely than it is below p.
    probs = softmax(logits.astype(np.float64))
    order = np.argsort(-probs)
    mass_before = np.concatenate([[0.0], np.cumsum(probs[order])[:-1]])
    assert set(np.flatnonzero(np.isfinite(ours))) == set(order[mass_before < p].tolist())


def test_greedy_is_argmax_after_penalty() -> None:
    greedy = make_sampler(temperature=0.0)
    for seed in range(20):
        logits = _logits(seed)
        assert greedy(logits, []) == int(np.argmax(logits))
    logits = _logits(0)
    best = int(np.argmax(logits))
    penalised = make_sampler(temperature=0.0, repetition_penalty=1e6)
    assert penalised(logits, [best]) == int(np.argsort(-logits)[1])


def test_seeded_sampling_is_deterministic_and_seed_dependent() -> None:
    logits = _logits(3)
    a, b = make_sampler(temperature=1.0, seed=7), make_sampler(temperature=1.0, seed=7)
    seq_a = [a(logits, []) for _ in range(50)]
    assert seq_a == [b(logits, []) for _ in range(50)]
    c = make_sampler(temperature=1.0, seed=8)
    assert seq_a != [c(logits, []) for _ in range(50)]


def test_samples_follow_softmax_and_respect_masks() -> None:
    logits = np.array([2.0, 1.0, 0.0, -1.0, -3.0], dtype=np.float32)
    temperature, n = 0.7, 20000
    sampler = make_sampler(temperature=temperature, seed=0)
    counts = np.bincount([sampler(logits, []) for _ in range(n)], minlength=5) / n
    expected = softmax(logits.astype(np.float64) / temperature)
    np.testing.assert_allclose(counts, expected, atol=0.015)
    top2 = make_sampler(temperature=5.0, top_k=2, seed=1)
    assert {top2(logits, []) for _ in range(500)} == {0, 1}
    nucleus = make_sampler(temperature=1.0, top_p=0.5, seed=2)  # token 0 alone holds > 0.5 of the mass
    assert {nucleus(logits, []) for _ in range(200)} == {0}


def test_sampler_from_config_and_validation() -> None:
    logits = _logits(4)
    cfg = GenerationConfig(temperature=0.9, top_k=20, top_p=0.8, repetition_penalty=1.2, seed=5)
    direct = make_sampler(0.9, 20, 0.8, 1.2, 5)
    from_cfg = sampler_from_config(cfg)
    assert [direct(logits, [1, 2]) for _ in range(30)] == [from_cfg(logits, [1, 2]) for _ in range(30)]
    with pytest.raises(ValueError, match="temperature"):
        make_sampler(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        make_sampler(top_p=0)

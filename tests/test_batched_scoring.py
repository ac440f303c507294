"""Batched option scoring: `DecoderSession.continuation_logits` runs all options of an item together.

References: the same continuations decoded one by one on forks of the same cache (what scoring did
before), for both decoder flavours (torch-exported, KV concatenated; onnxruntime-genai builder,
in-place GroupQueryAttention buffers), and the direct PyTorch computation of each option's
log-likelihood for `Pipeline.score`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fundusrt.runtime.backends.base import DecoderSession, continuation_logits_by_forks
from fundusrt.runtime.pipeline import Pipeline, load_package
from tests._dicom_fixtures import fundus_picture

torch = pytest.importorskip("torch")

from tests.test_runtime_pipeline import built  # noqa: E402,F401  (the torch-exported package, shared)
from tests.test_scoring import protocol_with, reference_log_likelihood  # noqa: E402

# Unequal lengths, the longest not last: the shorter rows are padded while the longest advances.
CONTINUATIONS = [[9, 11], [5], [13, 15, 17], [21, 21]]
# 1, 2, 3 and 4 tokens with the tiny tokenizer (checked in the test)
OPTIONS = ["A", "proliferative retinopathy", "Left", "haemorrhage"]


@pytest.fixture(scope="module")
def packages(built: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same checkpoint as a torch-exported package ("concat" cache) and a builder one ("shared")."""
    pytest.importorskip("onnxruntime_genai", reason="the builder decoder needs onnxruntime-genai (the export extra)")
    from fundusrt.export import export_package
    from fundusrt.export.genai import GenaiDecoderOptions

    shared = export_package(built[0], tmp_path_factory.mktemp("genai") / "pkg",
                            genai_decoder=GenaiDecoderOptions(precision="fp32"))
    return {"concat": built[1], "shared": Path(shared)}


def prefilled(pipe: Pipeline) -> DecoderSession:
    _, embeds = pipe.prompt_embeds(pipe.encode_image(fundus_picture(256, 256, seed=1)), "Which eye is this?")
    decoder = pipe.sessions.decoder
    decoder.reset()
    decoder.prefill(embeds)
    return decoder


@pytest.mark.parametrize("flavour", ["concat", "shared"])
def test_batched_continuations_equal_one_fork_each(flavour: str, packages: dict[str, Path]) -> None:
    pipe = load_package(packages[flavour], threads=1)
    assert pipe.manifest.decoder.kv_cache == flavour
    decoder = prefilled(pipe)
    held = decoder.seq_len
    next_logits = decoder.fork().decode(7)
    expected = []
    for continuation in CONTINUATIONS:
        branch = decoder.fork()
        expected.append(np.stack([branch.decode(token) for token in continuation]))
    batched = decoder.continuation_logits(CONTINUATIONS)
    assert [rows.shape for rows in batched] == [(len(c), pipe.manifest.decoder.vocab_size) for c in CONTINUATIONS]
    for continuation, ours, theirs in zip(CONTINUATIONS, batched, expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-4, err_msg=str(continuation))
    assert np.abs(batched[0][0] - batched[2][0]).max() > 1e-2  # the rows are not one row repeated
    # the batch-1 path (what the TensorRT backend runs) gives the same
    for ours, theirs in zip(continuation_logits_by_forks(decoder, CONTINUATIONS), expected, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=1e-6)
    # this session's cache is untouched: it continues as if nothing had been scored
    assert decoder.seq_len == held
    np.testing.assert_allclose(decoder.decode(7), next_logits, atol=1e-6)


def test_bad_continuations_are_refused(packages: dict[str, Path]) -> None:
    decoder = prefilled(load_package(packages["concat"], threads=1))
    with pytest.raises(ValueError, match="at least one token"):
        decoder.continuation_logits([[5], []])
    too_long = [[5] * (decoder.max_seq_len - decoder.seq_len + 1)]
    with pytest.raises(ValueError, match="exceeds the package's max_seq_len"):
        decoder.continuation_logits(too_long)
    assert decoder.continuation_logits([]) == []


class RecordingDecoder:
    """Forwards to a real decoder session and records the scoring calls made on it and its forks."""

    def __init__(self, inner: DecoderSession, calls: list[tuple]) -> None:
        self._inner, self.calls = inner, calls

    def __getattr__(self, name: str):  # seq_len, max_seq_len, prefill, reset
        return getattr(self._inner, name)

    def fork(self) -> RecordingDecoder:
        return RecordingDecoder(self._inner.fork(), self.calls)

    def decode(self, token_id: int) -> np.ndarray:
        self.calls.append(("decode",))
        return self._inner.decode(token_id)

    def continuation_logits(self, continuations: list[list[int]]) -> list[np.ndarray]:
        self.calls.append(("batch", [len(c) for c in continuations]))
        return self._inner.continuation_logits(continuations)


@pytest.mark.parametrize("flavour", ["concat", "shared"])
def test_scores_of_multi_token_options_equal_the_pytorch_reference(flavour: str, packages: dict[str, Path],
                                                                  built: tuple[Path, Path]) -> None:
    from fundusrt.models import load

    pipe = load_package(packages[flavour], threads=1)
    lengths = [len(pipe.tokenizer.encode(a, add_special_tokens=False).ids) for a in OPTIONS]
    assert lengths == [1, 2, 3, 4]
    calls: list[tuple] = []
    pipe.sessions = dataclasses.replace(pipe.sessions, decoder=RecordingDecoder(pipe.sessions.decoder, calls))
    protocol = protocol_with({"single": ["A", "B", "C"], "mixed": OPTIONS})
    image = np.random.default_rng(5).integers(0, 256, (96, 120, 3), dtype=np.uint8)
    scores = pipe.score(image, protocol)
    # one batched pass for the item's three multi-token options (each fed all but its last token), none for
    # the single-token item, and no option decoded on a fork of its own
    assert calls == [("batch", [1, 2, 3])]
    model = load(built[0])
    item = protocol.item("mixed")
    expected = {a: reference_log_likelihood(model, pipe, image, item.question, a) for a in OPTIONS}
    worst = max(abs(scores["mixed"].log_likelihoods[a] - expected[a]) for a in OPTIONS)
    assert worst < 1e-4, f"log-likelihood max abs diff {worst:.3g}: {scores['mixed'].log_likelihoods} vs {expected}"
    reference = np.exp(np.array(list(expected.values())) - max(expected.values()))
    np.testing.assert_allclose(list(scores["mixed"].probabilities.values()), reference / reference.sum(), atol=1e-4)

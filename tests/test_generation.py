"""The generation loop's stop conditions and the text stream's stop strings and streaming."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fundusrt.runtime.backends.base import continuation_logits_by_forks
from fundusrt.runtime.generation import TextStream, generate_tokens
from fundusrt.runtime.sampling import make_sampler

VOCAB = 16


class MarkovDecoder:
    """A real DecoderSession whose next-token logits depend only on the last token (one-hot embeddings)."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = table
        self.calls: list[str] = []
        self._seq_len = 0

    @property
    def seq_len(self) -> int:
        return self._seq_len

    @property
    def max_seq_len(self) -> int:
        return 1000

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        self.calls.append("prefill")
        self._seq_len += inputs_embeds.shape[1]
        return self.table[int(np.argmax(inputs_embeds[0, -1]))]

    def decode(self, token_id: int) -> np.ndarray:
        self.calls.append("decode")
        self._seq_len += 1
        return self.table[token_id]

    def reset(self) -> None:
        self._seq_len = 0

    def fork(self) -> MarkovDecoder:
        other = MarkovDecoder(self.table)
        other._seq_len = self._seq_len
        return other

    def continuation_logits(self, continuations: list[list[int]]) -> list[np.ndarray]:
        return continuation_logits_by_forks(self, continuations)


def _one_hot(ids: list[int]) -> np.ndarray:
    return np.eye(VOCAB, dtype=np.float32)[ids][None]


def _chain_table(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)).astype(np.float32)


def _greedy_chain(table: np.ndarray, last: int, n: int) -> list[int]:
    out = []
    for _ in range(n):
        last = int(np.argmax(table[last]))
        out.append(last)
    return out


def test_greedy_follows_argmax_chain_and_wastes_no_step() -> None:
    table = _chain_table()
    decoder = MarkovDecoder(table)
    tokens = list(generate_tokens(decoder, _one_hot([3, 5]), make_sampler(), max_new_tokens=7))
    assert tokens == _greedy_chain(table, 5, 7)
    assert decoder.calls == ["prefill"] + ["decode"] * 6
    assert decoder.seq_len == 2 + 6


def test_stop_token_ends_generation_without_being_yielded() -> None:
    table = _chain_table(1)
    chain = _greedy_chain(table, 2, 20)
    stop = chain[3]
    expected = chain[:chain.index(stop)]
    tokens = list(generate_tokens(MarkovDecoder(table), _one_hot([2]), make_sampler(),
                                  max_new_tokens=20, stop_token_ids=[stop]))
    assert tokens == expected and stop not in tokens


def test_closing_the_generator_stops_decoding() -> None:
    decoder = MarkovDecoder(_chain_table(2))
    tokens = generate_tokens(decoder, _one_hot([1]), make_sampler(), max_new_tokens=50)
    taken = [next(tokens) for _ in range(3)]
    tokens.close()
    assert len(taken) == 3 and decoder.calls == ["prefill", "decode", "decode"]


def test_repetition_penalty_sees_prompt_ids() -> None:
    table = np.zeros((VOCAB, VOCAB), dtype=np.float32)
    table[:, 4] = 5.0  # 4 is always the best token, 9 the second best
    table[:, 9] = 4.0
    plain = list(generate_tokens(MarkovDecoder(table), _one_hot([4]), make_sampler(), max_new_tokens=1))
    penalised = list(generate_tokens(MarkovDecoder(table), _one_hot([4]), make_sampler(repetition_penalty=2.0),
                                     max_new_tokens=1, prompt_ids=[4]))
    assert plain == [4] and penalised == [9]


def test_max_new_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(generate_tokens(MarkovDecoder(_chain_table()), _one_hot([0]), make_sampler(), max_new_tokens=0))


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a few words: accented letters stay split over two byte tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|end|>"])
    tokenizer.train_from_iterator(["the optic disc is normal", "no haemorrhage seen", "STOP here"] * 20, trainer)
    return tokenizer


def _stream(tokenizer: Tokenizer, text: str, stop_strings: list[str]) -> tuple[TextStream, list[str], int]:
    pieces: list[str] = []
    stream = TextStream(tokenizer, stop_strings, pieces.append)
    ids = tokenizer.encode(text).ids
    pushed = 0
    for token in ids:
        pushed += 1
        if stream.push(token):
            break
    stream.finish()
    return stream, pieces, pushed


def test_text_stream_streams_exactly_the_final_text(byte_tokenizer: Tokenizer) -> None:
    text = "the disc é normal ü seen"
    stream, pieces, _ = _stream(byte_tokenizer, text, [])
    assert stream.text == text and "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # split multi-byte characters are held until complete


def test_text_stream_stop_string_cuts_and_never_streams_it(byte_tokenizer: Tokenizer) -> None:
    text = "no haemorrhage STOP here and more"
    stream, pieces, pushed = _stream(byte_tokenizer, text, ["STOP"])
    assert stream.stopped and stream.text == "no haemorrhage "
    assert "".join(pieces) == "no haemorrhage "
    ids = byte_tokenizer.encode(text).ids
    assert "STOP" in byte_tokenizer.decode(ids[:pushed])
    assert "STOP" not in byte_tokenizer.decode(ids[:pushed - 1])  # stopped at the first id that completes it


def test_text_stream_holds_back_a_possible_stop_prefix(byte_tokenizer: Tokenizer) -> None:
    pieces: list[str] = []
    stream = TextStream(byte_tokenizer, ["seen."], pieces.append)
    for token in byte_tokenizer.encode("no haemorrhage seen").ids:
        stream.push(token)
    assert "".join(pieces) == "no haemorrhage "  # "seen" could still become "seen."
    assert stream.finish() == "no haemorrhage seen" and "".join(pieces) == "no haemorrhage seen"

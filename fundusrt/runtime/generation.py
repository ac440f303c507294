"""Backend-agnostic generation: a generator of token ids over a DecoderSession (after nanochat's engine).

The engine speaks ids and embeddings only. Stop strings need text, so `TextStream` (fed by the
layer that owns the tokenizer) turns ids into streamed text and finds stop strings in it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Protocol

import numpy as np

from fundusrt.runtime.backends.base import DecoderSession
from fundusrt.runtime.sampling import Sampler


def generate_tokens(
    decoder: DecoderSession,
    inputs_embeds: np.ndarray,
    sampler: Sampler,
    *,
    max_new_tokens: int,
    stop_token_ids: Collection[int] = (),
    prompt_ids: Sequence[int] = (),
) -> Iterator[int]:
    """Prefill `inputs_embeds` after the decoder's current cache, then yield sampled ids one at a time.

    Stops after `max_new_tokens` ids or at the first id in `stop_token_ids` (which is not yielded).
    Closing the generator early (e.g. on a stop string) skips the remaining decoder steps. The
    decoder holds every yielded id but the last in its cache: the last one is only sampled, never
    run, so no step is wasted.

    Args:
        decoder: a session positioned where the prompt continues (usually freshly reset).
        inputs_embeds: (1, seq, hidden) prompt embeddings.
        sampler: picks the next id from logits and the history.
        max_new_tokens: upper bound on yielded ids.
        stop_token_ids: ids that end generation.
        prompt_ids: the prompt's ids, the start of the history the repetition penalty sees.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stop = frozenset(int(t) for t in stop_token_ids)
    history = [int(t) for t in prompt_ids]
    logits = decoder.prefill(inputs_embeds)
    for step in range(max_new_tokens):
        token = sampler(logits, history)
        if token in stop:
            return
        yield token
        history.append(token)
        if step + 1 < max_new_tokens:
            logits = decoder.decode(token)


class Decoder(Protocol):
    """The tokenizer call TextStream needs (`tokenizers.Tokenizer.decode`)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Turns generated ids into text, streams the part that is final, and detects stop strings.

    Text is decoded from all ids so far (byte-level tokens only make sense together), and a tail
    is held back while it ends in an incomplete character or could still grow into a stop string.
    """

    def __init__(self, tokenizer: Decoder, stop_strings: Sequence[str] = (),
                 on_text: Callable[[str], None] | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = [s for s in stop_strings if s]
        self._on_text = on_text
        self._ids: list[int] = []
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> bool:
        """Add one id; return True when a stop string has appeared (the text is then cut before it)."""
        self._ids.append(token_id)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self._stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            self._emit(len(self.text))
            return True
        self.text = text
        self._emit(self._safe_end(text))
        return False

    def finish(self) -> str:
        """Flush the held-back tail and return the final text."""
        if not self.stopped:
            self._emit(len(self.text))
        return self.text

    def _safe_end(self, text: str) -> int:
        # An incomplete UTF-8 sequence decodes to U+FFFD: wait for its other bytes.
        text = text.rstrip("\ufffd")
        hold = max((n for stop in self._stop_strings for n in range(1, min(len(stop), len(text) + 1))
                    if text.endswith(stop[:n])), default=0)
        return len(text) - hold

    def _emit(self, end: int) -> None:
        if end > self._emitted:
            if self._on_text is not None:
                self._on_text(self.text[self._emitted:end])
            self._emitted = end

"""Prompt rendering shared by the runtime, the PyTorch reference and training, so they cannot drift.

Image placeholders are expanded at the id level (never by tokenising thousands of image tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from fundusrt.manifest import PromptSpec


class PromptError(ValueError):
    """The question and images do not fit the prompt format."""


class TokenizerLike(Protocol):
    """The two calls we need from `tokenizers.Tokenizer` (or a compatible wrapper)."""

    def token_to_id(self, token: str) -> int | None: ...

    def encode(self, sequence: str, add_special_tokens: bool = ...) -> object: ...  # has .ids


def render_text(spec: PromptSpec, question: str, num_images: int, system_message: str | None = None) -> str:
    """The single-turn prompt as text, with one `spec.image_placeholder` per image.

    Like InternVL's `chat()`, placeholders are prepended (one line each) when the question has none.
    """
    placeholder = spec.image_placeholder
    found = question.count(placeholder)
    if found == 0 and num_images:
        question = (placeholder + "\n") * num_images + question
    elif found != num_images:
        raise PromptError(f"question has {found} {placeholder!r} placeholders but {num_images} images were given")
    system = spec.system_message if system_message is None else system_message
    text = spec.system_template.format(system=system) if spec.system_template else ""
    return text + spec.user_template.format(content=question) + spec.assistant_prefix


def _special_id(tokenizer: TokenizerLike, token: str) -> list[int]:
    if not token:
        return []
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise PromptError(f"tokenizer has no token {token!r}; the package's tokenizer and manifest disagree")
    return [token_id]


def build_input_ids(
    spec: PromptSpec,
    tokenizer: TokenizerLike,
    question: str,
    image_token_counts: Sequence[int] = (),
    system_message: str | None = None,
) -> np.ndarray:
    """Token ids (1-D int64) of a single-turn prompt with image token runs spliced in.

    Args:
        spec: the package's prompt spec.
        tokenizer: a `tokenizers.Tokenizer` loaded from the package.
        question: user text; may contain `spec.image_placeholder` once per image.
        image_token_counts: number of image feature tokens of each image, in order.
        system_message: overrides the package's system message.
    """
    text = render_text(spec, question, len(image_token_counts), system_message)
    pieces = text.split(spec.image_placeholder)
    start, end = _special_id(tokenizer, spec.image_start), _special_id(tokenizer, spec.image_end)
    ids: list[int] = [] if spec.bos_token_id is None else [spec.bos_token_id]
    for i, piece in enumerate(pieces):
        if piece:
            ids.extend(tokenizer.encode(piece, add_special_tokens=False).ids)  # type: ignore[attr-defined]
        if i < len(image_token_counts):
            count = int(image_token_counts[i])
            if count <= 0:
                raise PromptError(f"image {i} has {count} feature tokens; expected a positive count")
            ids.extend(start + [spec.image_token_id] * count + end)
    return np.asarray(ids, dtype=np.int64)

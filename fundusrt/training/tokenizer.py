"""The tokenizer of a model trained from scratch: byte-level BPE over a given corpus.

Same special tokens, pre-tokenizer and decoder as `fundusrt.models.tokenizer.build_tokenizer` (the
built-in corpus); here the corpus is the caller's, so the words of the training data become tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from fundusrt.models.tokenizer import SPECIAL_TOKENS

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def train_tokenizer(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer whose first ids are SPECIAL_TOKENS.

    Args:
        corpus: training texts (any iterable of strings).
        vocab_size: target size including the 256 byte tokens and the special tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + special tokens), "
                         f"got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer

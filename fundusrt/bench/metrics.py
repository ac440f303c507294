"""Text metrics of the evaluation sets: BLEU-4, ROUGE-L and multiple-choice option extraction.

Written here rather than imported (sacrebleu, rouge-score, VLMEvalKit) so that the harness needs
no downloads and its numbers follow the definitions below exactly:

- BLEU-4 is corpus BLEU (Papineni et al. 2002): clipped n-gram precisions for n = 1..4 summed over
  the corpus, their geometric mean with uniform weights, times the brevity penalty
  exp(1 - r/c) when the candidate length c is below the effective reference length r (the
  reference length closest to each candidate's, the shorter on ties). No smoothing: a corpus with
  no matching 4-gram scores 0.
- ROUGE-L is the LCS F1 of each candidate against its best reference (Lin 2004, beta = 1, as the
  rouge-score package reports `fmeasure`), averaged over candidates.
- Tokens are lower-cased words and single punctuation marks.
- Option extraction follows VLMEvalKit's exact matching (`can_infer`): a letter standing alone
  once among the answer's words, else the one option whose text the answer contains.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

_TOKEN = re.compile(r"\w+|[^\w\s]")
# VLMEvalKit strips these before looking for a standalone option letter.
_OPTION_PUNCTUATION = str.maketrans({c: " " for c in ".()[],:;!*#{}"})
# Answers that refuse; VLMEvalKit scores them as the impossible option "Z".
_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
             "I'm sorry, but without the image provided", "Cannot determine the answer")
REFUSED = "Z"


def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return _TOKEN.findall(text.lower())


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu4(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] (definition in the module docstring).

    Args:
        candidates: one generated text per item.
        references: the reference texts of each item (at least one per item).

    Raises:
        ValueError: lengths differ, or an item has no reference.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    matched, total = [0] * 4, [0] * 4
    cand_len = ref_len = 0
    for i, (cand, refs) in enumerate(zip(candidates, references, strict=True)):
        if not refs:
            raise ValueError(f"item {i} has no reference text")
        hyp = tokenize(cand)
        ref_tokens = [tokenize(r) for r in refs]
        cand_len += len(hyp)
        ref_len += min((len(r) for r in ref_tokens), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, 5):
            counts = _ngrams(hyp, n)
            best: Counter[tuple[str, ...]] = Counter()
            for r in ref_tokens:
                best |= _ngrams(r, n)
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += sum(counts.values())
    if cand_len == 0 or 0 in matched:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / 4
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_precision)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_pair(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of one candidate against one reference."""
    hyp, ref = tokenize(candidate), tokenize(reference)
    lcs = lcs_length(hyp, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hyp), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean over items of the best ROUGE-L F1 against the item's references."""
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if not candidates:
        return 0.0
    if any(not refs for refs in references):
        raise ValueError("every item needs at least one reference text")
    return sum(max(rouge_l_pair(c, r) for r in refs)
               for c, refs in zip(candidates, references, strict=True)) / len(candidates)


def extract_option(answer: str, options: Mapping[str, str]) -> str | None:
    """The option letter an answer picks (VLMEvalKit exact matching), REFUSED for refusals, None if unclear.

    Args:
        answer: the generated text.
        options: letter -> option text, e.g. {"A": "No DR", "B": "Mild NPDR"}.
    """
    if any(refusal in answer for refusal in _REFUSALS):
        return REFUSED
    words = answer.translate(_OPTION_PUNCTUATION).split()
    letters = [letter for letter in options if letter in words]
    if len(letters) == 1:
        return letters[0]
    if not letters and words.count(REFUSED) == 1:
        return REFUSED
    # Fall back to the option text, but only for short answers: a long answer quotes several options.
    lowered = answer.lower()
    if len(lowered) > 2 * sum(len(str(text)) for text in options.values()):
        return None
    found = [letter for letter, text in options.items() if str(text).lower() in lowered]
    return found[0] if len(found) == 1 else None


def mcq_prompt(question: str, options: Mapping[str, str], hint: str | None = None) -> str:
    """The prompt VLMEvalKit's ImageMCQDataset builds (GMAI-MMBench, Fundus-MMBench)."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


OPTION_LETTERS = tuple(string.ascii_uppercase)

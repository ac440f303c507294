"""The accuracy gate: does the quantised package still answer like the fp32 one on held-out images?

Three kinds of figures, all against the fp32 package on the same held-out images and prompts:

- per-component cosine: each quantised component is fed exactly the fp32 inputs (patchify output
  for vision, fp32 vision features for the connector, fp32 spliced prompt embeddings for the
  decoder's prefill logits), so a figure blames one component, not the ones before it;
- MCQ agreement, end to end: the option letter with the highest first-token logit, as in
  likelihood-based MCQ scoring (VLMEvalKit), must be the same letter fp32 picks. Only for packages
  that declare they answer MCQs (`"mcq_prompt"` in the manifest's extra, `fundusrt export
  --answers-mcq`): a model never taught the prompt answers it with near-ties, which any rounding
  flips (the demo's int4 decoder: token agreement 1.000, MCQ agreement 0.438);
- token agreement, end to end: the quantised decoder is teacher-forced along fp32's greedy
  answer and its own argmax compared at every position. Up to the first mismatch this is exactly
  what free-running generation would produce, so `exact_match` (no mismatch at all) is also the
  share of answers generated identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fundusrt.calibration.dataset import CalibrationError, Prompt, SourceImage
from fundusrt.kernels import patchify
from fundusrt.manifest import MCQ_PROMPT_KEY
from fundusrt.runtime.pipeline import Pipeline


@dataclass(frozen=True)
class GateThresholds:
    """Minimum figures a quantised package must reach (cosines are the worst sample's)."""

    vision_cosine: float = 0.99
    connector_cosine: float = 0.99
    decoder_cosine: float = 0.98
    mcq_agreement: float = 0.9
    token_agreement: float = 0.85

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= value <= 1.0:
                raise CalibrationError(f"gate threshold {name} must be in [0, 1], got {value}")


def add_threshold_arguments(parser: Any) -> None:
    """`--min-<figure>` options for every GateThresholds field (the `calibrate` and `gate` verbs share them)."""
    defaults = GateThresholds()
    for name in GateThresholds.__dataclass_fields__:
        parser.add_argument(f"--min-{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                            dest=f"min_{name}", help=f"gate threshold (default {getattr(defaults, name)})")


def thresholds_from_arguments(args: Any) -> GateThresholds:
    """The GateThresholds given by `add_threshold_arguments` options."""
    return GateThresholds(**{name: getattr(args, f"min_{name}") for name in GateThresholds.__dataclass_fields__})


@dataclass
class GateReport:
    """Figures, thresholds, the verdict and why it failed."""

    passed: bool
    figures: dict[str, Any]
    thresholds: dict[str, float]
    failures: list[str] = field(default_factory=list)
    holdout: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line per figure, for the CLI."""
        f = self.figures
        lines = [f"{c} cosine: min {f[c]['cosine_min']:.4f}, mean {f[c]['cosine_mean']:.4f} "
                 f"({f[c]['samples']} samples)" for c in ("vision", "connector", "decoder")]
        if f["mcq"]["questions"]:
            lines.append(f"MCQ agreement: {f['mcq']['agreement']:.3f} ({f['mcq']['questions']} questions)")
        if f["tokens"]["positions"]:
            lines.append(f"token agreement: {f['tokens']['agreement']:.3f} over {f['tokens']['positions']} tokens, "
                         f"exact answers {f['tokens']['exact_match']:.3f} ({f['tokens']['answers']} answers)")
        lines.append("gate: " + ("passed" if self.passed else "FAILED: " + "; ".join(self.failures)))
        return "\n".join(lines)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two arrays, flattened, computed in float64 (1.0 for two zero arrays)."""
    x, y = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = np.linalg.norm(x) * np.linalg.norm(y)
    if norms == 0.0:
        return 1.0 if not x.any() and not y.any() else 0.0
    return float(x @ y / norms)


def _stats(values: Sequence[float]) -> dict[str, Any]:
    return {"cosine_min": min(values), "cosine_mean": float(np.mean(values)), "samples": len(values)}


def option_token_ids(pipe: Pipeline, letters: str) -> list[int]:
    """The id of each option letter as the first token of an answer; they must be distinct."""
    ids = [pipe.tokenizer.encode(letter, add_special_tokens=False).ids[0] for letter in letters]
    if len(set(ids)) != len(ids):
        raise CalibrationError(f"option letters {letters!r} share tokens {ids} in this tokenizer; "
                               "MCQ answers cannot be told apart")
    return ids


def _component_cosines(fp32: Pipeline, quant: Pipeline, images: Sequence[SourceImage],
                       prompts: Sequence[Prompt]) -> dict[str, Any]:
    comps = fp32.manifest.components
    vision_in, vision_out = comps["vision"].inputs[0].name, comps["vision"].outputs[0].name
    conn_in, conn_out = comps["connector"].inputs[0].name, comps["connector"].outputs[0].name
    cosines: dict[str, list[float]] = {"vision": [], "connector": [], "decoder": []}
    for image in images:
        pixel_values = patchify(image.pixels, fp32.manifest.preprocessing).pixel_values
        features = fp32.sessions.vision.run({vision_in: pixel_values})[vision_out]
        cosines["vision"].append(cosine(features, quant.sessions.vision.run({vision_in: pixel_values})[vision_out]))
        cosines["connector"].append(cosine(fp32.sessions.connector.run({conn_in: features})[conn_out],
                                           quant.sessions.connector.run({conn_in: features})[conn_out]))
        encoded = fp32.encode_image(image.pixels)
        for prompt in prompts:
            _, embeds = fp32.prompt_embeds(encoded, prompt.text())
            logits = []
            for pipe in (fp32, quant):
                pipe.sessions.decoder.reset()
                logits.append(pipe.sessions.decoder.prefill(embeds))
            cosines["decoder"].append(cosine(*logits))
    return {name: _stats(values) for name, values in cosines.items()}


def _first_logits(pipe: Pipeline, encoded: Any, prompt: Prompt) -> np.ndarray:
    _, embeds = pipe.prompt_embeds(encoded, prompt.text())
    pipe.sessions.decoder.reset()
    return pipe.sessions.decoder.prefill(embeds)


def _greedy(pipe: Pipeline, encoded: Any, prompt: Prompt, max_new_tokens: int) -> list[int]:
    """fp32's greedy answer, ending with the stop token when one was produced."""
    decoder, stops = pipe.sessions.decoder, set(pipe.manifest.prompt.stop_token_ids)
    logits = _first_logits(pipe, encoded, prompt)
    tokens: list[int] = []
    for step in range(max_new_tokens):
        tokens.append(int(np.argmax(logits)))
        if tokens[-1] in stops or step + 1 == max_new_tokens or decoder.seq_len + 1 >= decoder.max_seq_len:
            break
        logits = decoder.decode(tokens[-1])
    return tokens


def _teacher_forced_matches(pipe: Pipeline, encoded: Any, prompt: Prompt, reference: Sequence[int]) -> list[bool]:
    decoder = pipe.sessions.decoder
    logits = _first_logits(pipe, encoded, prompt)
    matches = []
    for i, token in enumerate(reference):
        matches.append(int(np.argmax(logits)) == token)
        if i + 1 < len(reference):
            logits = decoder.decode(token)
    return matches


def evaluate_gate(fp32: Pipeline, quant: Pipeline, images: Sequence[SourceImage], prompts: Sequence[Prompt],
                  thresholds: GateThresholds, *, max_new_tokens: int = 32) -> GateReport:
    """Compare `quant` with `fp32` on held-out `images` x `prompts` and judge against `thresholds`.

    Args:
        fp32: the reference package.
        quant: the quantised package (same tokenizer, prompt and preprocessing).
        images: held-out images, never used for calibration.
        prompts: open questions (token agreement) and multiple-choice ones (MCQ agreement, asked only
            when `fp32` declares it answers MCQs).
        thresholds: the minimum figures.
        max_new_tokens: length of the fp32 reference answers for token agreement.
    """
    if not images:
        raise CalibrationError("the accuracy gate needs at least one held-out image")
    open_prompts = [p for p in prompts if not p.options]
    mcq_prompts = [p for p in prompts if p.options] if MCQ_PROMPT_KEY in fp32.manifest.extra else []
    figures: dict[str, Any] = _component_cosines(fp32, quant, images, prompts)
    agree, asked = 0, 0
    positions, matched, exact, answers = 0, 0, 0, 0
    for image in images:
        pairs = [(pipe, pipe.encode_image(image.pixels)) for pipe in (fp32, quant)]
        for prompt in mcq_prompts:
            letter_ids = option_token_ids(fp32, prompt.letters)
            choices = [int(np.argmax(_first_logits(pipe, encoded, prompt)[letter_ids])) for pipe, encoded in pairs]
            agree += choices[0] == choices[1]
            asked += 1
        for prompt in open_prompts:
            reference = _greedy(fp32, pairs[0][1], prompt, max_new_tokens)
            matches = _teacher_forced_matches(quant, pairs[1][1], prompt, reference)
            positions += len(matches)
            matched += sum(matches)
            exact += all(matches)
            answers += 1
    figures["mcq"] = {"agreement": agree / asked if asked else 1.0, "questions": asked}
    figures["tokens"] = {"agreement": matched / positions if positions else 1.0, "positions": positions,
                         "exact_match": exact / answers if answers else 1.0, "answers": answers}
    limits = asdict(thresholds)
    failures = [f"{c} cosine {figures[c]['cosine_min']:.4f} < {limits[f'{c}_cosine']}"
                for c in ("vision", "connector", "decoder") if figures[c]["cosine_min"] < limits[f"{c}_cosine"]]
    if asked and figures["mcq"]["agreement"] < thresholds.mcq_agreement:
        failures.append(f"MCQ agreement {figures['mcq']['agreement']:.3f} < {thresholds.mcq_agreement}")
    if positions and figures["tokens"]["agreement"] < thresholds.token_agreement:
        failures.append(f"token agreement {figures['tokens']['agreement']:.3f} < {thresholds.token_agreement}")
    return GateReport(passed=not failures, figures=figures, thresholds=limits, failures=failures,
                      holdout={"images": len(images), "open_questions": len(open_prompts),
                               "mcq_questions": len(mcq_prompts), "max_new_tokens": max_new_tokens})

"""The baseline every speed is compared with: the same weights through transformers' eager `generate()`.

`fundusrt.models.load` builds the PyTorch reference LVLM from the checkpoint; its vision tower and
connector encode the tiles, the image features are spliced into the prompt embeddings, and the
decoder is the transformers causal LM itself, run with `generate(inputs_embeds=...)` (greedy,
KV cache, PyTorch eager mode). It answers through the same interface as the runtime's Pipeline
(`ask_many`), with the same stage timings, so the harness measures both the same way. Build-side
only: it imports torch and transformers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.config import GenerationConfig, TilingConfig
from fundusrt.kernels import patchify
from fundusrt.prompt import build_input_ids
from fundusrt.runtime.pipeline import Answer

BASELINE_NAME = "transformers-eager"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class TransformersBaseline:
    """A checkpoint answered by transformers `generate()`; `ask_many` mirrors `Pipeline.ask_many`."""

    def __init__(self, checkpoint: str | Path, threads: int | None = None, tiling: TilingConfig | None = None) -> None:
        """Load `checkpoint` (any layout fundusrt.models.load knows).

        Args:
            checkpoint: the checkpoint directory the package was exported from.
            threads: torch intra-op threads (None: torch's default).
            tiling: preprocessing to use (default: the checkpoint's); pass the package's to compare like with like.
        """
        import torch

        from fundusrt.models import load

        if threads:
            torch.set_num_threads(threads)
        self.checkpoint = Path(checkpoint)
        self.model = load(self.checkpoint).eval()
        self.tiling = tiling or self.model.config.tiling

    def info(self) -> dict[str, Any]:
        """Identity of the baseline for the bench JSON."""
        import torch

        return {"name": self.model.config.name, "backend": BASELINE_NAME, "checkpoint": str(self.checkpoint),
                "torch_threads": torch.get_num_threads()}

    def ask_many(self, image: np.ndarray, questions: Sequence[str],
                 gen: GenerationConfig | None = None) -> list[Answer]:
        """Answer each question about `image` (greedy; the image is encoded once)."""
        import torch

        gen = gen or GenerationConfig()
        if gen.temperature > 0:
            raise ValueError("the transformers baseline decodes greedily; use temperature 0")
        model = self.model
        with torch.inference_mode():
            start = time.perf_counter()
            patches = patchify(image, self.tiling)
            timings = {"patchify_ms": _ms(start)}
            start = time.perf_counter()
            features = model.vision_features(torch.from_numpy(patches.pixel_values))
            timings["vision_ms"] = _ms(start)
            start = time.perf_counter()
            image_embeds = model.connector(features)
            timings["connector_ms"] = _ms(start)
            tokens = image_embeds.shape[0] * image_embeds.shape[1]
            return [self._generate(q, image_embeds, tokens, patches.num_tiles, gen, dict(timings)) for q in questions]

    def _generate(self, question: str, image_embeds: Any, image_tokens: int, num_tiles: int,
                  gen: GenerationConfig, timings: dict[str, float]) -> Answer:
        import torch
        from transformers.generation.streamers import BaseStreamer

        model = self.model
        ids = build_input_ids(model.prompt, model.tokenizer, question, [image_tokens])
        ids_t = torch.from_numpy(ids)[None]
        embeds = model.splice(ids_t, model.embed(ids_t), image_embeds)
        stops = sorted(set(model.prompt.stop_token_ids) | set(gen.stop_token_ids))

        class _Clock(BaseStreamer):
            """Times each generated token (generate() first puts the prompt, then one token per step)."""

            def __init__(self) -> None:
                self.calls: list[float] = []

            def put(self, value: Any) -> None:
                self.calls.append(time.perf_counter())

            def end(self) -> None:
                return None

        clock = _Clock()
        start = time.perf_counter()
        out = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=torch.ones_like(ids_t), max_new_tokens=gen.max_new_tokens,
            do_sample=False, num_beams=1, eos_token_id=stops, pad_token_id=stops[0], streamer=clock,
            repetition_penalty=gen.repetition_penalty)
        end = time.perf_counter()
        # Given only inputs_embeds, generate() returns the new tokens alone.
        token_ids = [int(t) for t in out[0].tolist()]
        token_times = clock.calls[1:]
        first_ms = (token_times[0] - start) * 1000.0 if token_times else (end - start) * 1000.0
        decode_ms = (end - token_times[0]) * 1000.0 if token_times else 0.0
        steps = len(token_ids) - 1  # decoder steps after the first token, as the runtime counts them
        reason = "stop_token" if token_ids and token_ids[-1] in stops else "length"
        # the answer's tokens, as the runtime reports them: without the stop token
        answer_ids = token_ids[:-1] if reason == "stop_token" else token_ids
        text = model.tokenizer.decode([t for t in answer_ids if t not in stops])
        return Answer(text=text, token_ids=answer_ids, num_tiles=num_tiles, finish_reason=reason, timings={
            **timings, "shared_prefill_ms": 0.0, "prefill_ms": first_ms, "decode_ms": decode_ms,
            "prompt_tokens": float(len(ids)), "decode_steps": float(max(steps, 0)),
            "tokens_per_s": steps / (decode_ms / 1000.0) if steps > 0 and decode_ms > 0 else 0.0})

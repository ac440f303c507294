"""Record a calibration set by running the fp32 package through the real runtime pipeline.

Vision and connector feeds are observed, not recomputed: the pipeline's own sessions are wrapped
so whatever `Pipeline` feeds them (patchify output, then the vision tower's output) is what gets
recorded. The decoder is driven directly through its ONNX session because its feeds include the
KV states, which the runtime's DecoderSession keeps to itself: prefill gets the pipeline's spliced
image + text embeddings, then a short greedy continuation records decode steps with real caches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.calibration.dataset import CalibrationSet, Prompt, SourceImage
from fundusrt.manifest import DecoderSpec
from fundusrt.runtime.backends.base import Session
from fundusrt.runtime.pipeline import Pipeline

logger = logging.getLogger(__name__)


class _RecordingSession:
    """A Session that keeps a copy of every feed before delegating to the real one."""

    def __init__(self, inner: Session) -> None:
        self.inner = inner
        self.feeds: list[dict[str, np.ndarray]] = []

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.append({name: np.array(value) for name, value in inputs.items()})
        return self.inner.run(inputs)


class DecoderFeeds:
    """Runs decoder.onnx with explicit KV feeds (the decoder's contract in fundusrt.manifest)."""

    def __init__(self, decoder_path: Path, spec: DecoderSpec) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(decoder_path), sess_options=options,
                                             providers=["CPUExecutionProvider"])
        self._spec = spec
        layers = range(spec.num_layers)
        self.past_names = [t % i for i in layers for t in (spec.past_key, spec.past_value)]
        self.present_names = [t % i for i in layers for t in (spec.present_key, spec.present_value)]

    def empty_past(self) -> list[np.ndarray]:
        """An empty cache: one (1, kv_heads, 0, head_dim) array per past input."""
        empty = np.zeros((1, self._spec.num_kv_heads, 0, self._spec.head_dim), dtype=np.float32)
        return [empty] * len(self.past_names)

    def feed(self, embeds: np.ndarray, past: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The decoder inputs that append `embeds` (1, seq, hidden) after `past`."""
        past_len, seq = int(past[0].shape[2]), int(embeds.shape[1])
        feed = {
            "inputs_embeds": np.ascontiguousarray(embeds, dtype=np.float32),
            "attention_mask": np.ones((1, past_len + seq), dtype=np.int64),
            "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None],
        }
        feed.update(zip(self.past_names, past, strict=True))
        return feed

    def run(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Last-position logits (vocab,) and the presents (the next step's past)."""
        logits, *presents = self._session.run(["logits", *self.present_names], feed)
        return logits.reshape(-1, logits.shape[-1])[-1], presents


def record_calibration_set(pipe: Pipeline, images: Sequence[SourceImage], prompts: Sequence[Prompt], *,
                           key: str, prompts_per_image: int, decode_steps: int, record_decoder: bool = True,
                           info: dict[str, Any] | None = None) -> CalibrationSet:
    """Run the fp32 pipeline over `images` and `prompts` and record every quantised component's feeds.

    Image i is asked prompts i, i+1, ... (mod len(prompts)), `prompts_per_image` of them, so every
    prompt is seen across the set without asking every image everything.

    Args:
        pipe: the fp32 package, loaded with an ONNX Runtime backend.
        images: decoded fundus images.
        prompts: questions (multiple-choice ones rendered with their options).
        key: the cache key this set is stored under.
        prompts_per_image: prompts asked per image (>= 1).
        decode_steps: greedy decode steps recorded after each prefill (>= 0).
        record_decoder: False records vision and connector only (a decoder that is not to be quantised,
            such as onnxruntime-genai's, whose feeds this recorder does not drive).
        info: provenance stored with the set.
    """
    spec = pipe.manifest.decoder
    decoder_file = pipe.package_dir / pipe.manifest.components["decoder"].file
    decoder = DecoderFeeds(decoder_file, spec) if record_decoder else None
    embed_spec = pipe.manifest.components["embed"]
    vision, connector = _RecordingSession(pipe.sessions.vision), _RecordingSession(pipe.sessions.connector)
    original = pipe.sessions.vision, pipe.sessions.connector
    pipe.sessions.vision, pipe.sessions.connector = vision, connector
    decoder_feeds: list[dict[str, np.ndarray]] = []
    skipped: list[str] = []
    try:
        for index, image in enumerate(images):
            try:
                encoded = pipe.encode_image(image.pixels)
            except ValueError as exc:  # an image the tiling rejects must not stop the set
                skipped.append(f"{image.source}: {exc}")
                continue
            for j in range(prompts_per_image if decoder else 0):
                prompt = prompts[(index + j) % len(prompts)]
                try:
                    _, embeds = pipe.prompt_embeds(encoded, prompt.text())
                except ValueError as exc:  # PromptError: too long for the package
                    skipped.append(f"{image.source} / {prompt.question!r}: {exc}")
                    continue
                feed = decoder.feed(embeds, decoder.empty_past())
                for step in range(decode_steps + 1):
                    decoder_feeds.append(feed)
                    logits, past = decoder.run(feed)
                    if step == decode_steps or int(past[0].shape[2]) >= spec.max_seq_len:
                        break
                    token = np.array([[int(np.argmax(logits))]], dtype=np.int64)
                    token_embeds = pipe.sessions.embed.run({embed_spec.inputs[0].name: token})
                    feed = decoder.feed(token_embeds[embed_spec.outputs[0].name], past)
    finally:
        pipe.sessions.vision, pipe.sessions.connector = original
    for reason in skipped:
        logger.warning("calibration skipped %s", reason)
    return CalibrationSet(
        feeds={"vision": vision.feeds, "connector": connector.feeds} | ({"decoder": decoder_feeds} if decoder else {}),
        key=key, info={**(info or {}), "skipped": skipped},
    )

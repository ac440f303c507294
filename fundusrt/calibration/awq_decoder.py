"""AWQ scales for the decoders onnxruntime-genai's builder writes (`fundusrt export --decoder int4 --awq-images`).

`fundusrt.calibration.awq` scales an exported ONNX decoder, which it first runs in fp32 over the
calibration set. A builder decoder is written straight from the checkpoint, and at 8B there is no
fp32 decoder to run (nor the memory to hold one). So the statistics come from the torch decoder as
loaded for export: its weights memory-mapped in their stored 16-bit type, one forward pass per
calibration prompt (image features spliced in, as the runtime does), hooks recording each group's
input, and the mapped pages dropped after every layer so that the resident set stays near one layer.
The search itself is `awq.search_scales`, the one used for the ONNX decoders, with the same rounding
model of ORT's quantiser; the builder's streamed quantiser then applies the scales
(`fundusrt.export.genai`).

Groups, per decoder layer (the HF module names Llama / Qwen2 / InternLM2-as-Llama / Phi-3 share):
``attention`` (q/k/v or qkv, inverse folded into ``input_layernorm``), ``output`` (o, a Mul inserted
before it: with grouped-query attention v's output columns, where AutoAWQ folds it, are shared by
several query heads), ``mlp`` (gate/up or gate_up, into ``post_attention_layernorm``) and ``down``
(into the up projection's output columns).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fundusrt.calibration.awq import SAMPLE_ROWS, WeightGroup, search_scales
from fundusrt.calibration.dataset import CalibrationError, Prompt, SourceImage

logger = logging.getLogger(__name__)

ATTENTION, OUTPUT, MLP, DOWN = "attention", "output", "mlp", "down"


@dataclass(frozen=True)
class DecoderScales:
    """What the search found: per decoder layer, the scales of its groups that AWQ changes (alpha > 0).

    Attributes:
        layers: {layer index: {ATTENTION | OUTPUT | MLP | DOWN: (in_features,) float32 scales}}.
        summary: what the manifest records (groups searched and scaled, the sample's output-error ratio).
    """

    layers: dict[int, dict[str, np.ndarray]]
    summary: dict[str, Any]


def _first(module: Any, *names: str) -> Any:
    return next((getattr(module, n) for n in names if getattr(module, n, None) is not None), None)


def _groups(layer: Any) -> dict[str, list[Any]]:
    """The linears of each group of one decoder layer, in the module names the seed decoders use."""
    attn, mlp = layer.self_attn, layer.mlp
    fused_qkv, fused_gate_up = _first(attn, "qkv_proj"), _first(mlp, "gate_up_proj")
    groups = {
        ATTENTION: [fused_qkv] if fused_qkv is not None else [attn.q_proj, attn.k_proj, attn.v_proj],
        OUTPUT: [attn.o_proj],
        MLP: [fused_gate_up] if fused_gate_up is not None else [mlp.gate_proj, mlp.up_proj],
    }
    up = fused_gate_up if fused_gate_up is not None else mlp.up_proj
    if up.bias is None:  # dividing the up projection's output columns is exact only without a bias
        groups[DOWN] = [mlp.down_proj]
    return groups


def _prompt_embeds(model: Any, images: Sequence[SourceImage], prompts: Sequence[Prompt]) -> list[Any]:
    """One prompt per image (prompts taken in turn), as the runtime builds it, with the image features spliced in.

    Images are tiled at the checkpoint's fewest tiles: the statistics are per channel, and a prompt of
    one tile costs a CPU a fraction of a twelve-tile one.
    """
    import torch

    from fundusrt.kernels import patchify
    from fundusrt.prompt import build_input_ids

    config = model.config
    tiling = dataclasses.replace(config.tiling, max_tiles=config.tiling.min_tiles)
    dtype = model.language_model.get_input_embeddings().weight.dtype
    embeds = []
    with torch.inference_mode():
        for index, image in enumerate(images):
            tiles = patchify(image.pixels, tiling)
            pixels = torch.from_numpy(tiles.pixel_values).to(next(model.vision.parameters()).dtype)
            height, width = image.pixels.shape[:2]
            features = model.image_tokens(pixels, [(width, height)]).to(dtype)
            ids = build_input_ids(model.prompt, model.tokenizer, prompts[index % len(prompts)].text(),
                                  [features.shape[0]])
            input_ids = torch.from_numpy(ids).unsqueeze(0)
            embeds.append(model.splice(input_ids, model.embed(input_ids), features))
    return embeds


def search_decoder_scales(model: Any, images: Sequence[SourceImage], prompts: Sequence[Prompt], *, bits: int,
                          block_size: int, release: Callable[[], None] = lambda: None,
                          seed: int = 0) -> DecoderScales:
    """AWQ scales for `model`'s decoder (an `LVLM` as `fundusrt.models.load` gives it) for `bits`-bit,
    block-`block_size` rounding, from its activations on `images` x `prompts`.

    Args:
        release: drops the checkpoint's mapped pages (`model.mapped_weights.release`); called after each
            layer's forward and each group's search.
        seed: draws the token rows every group is judged on.

    Raises:
        CalibrationError: no images.
    """
    import time

    import torch

    if not images:
        raise CalibrationError("AWQ needs calibration images; pass fundus images or DICOM studies")
    start = time.perf_counter()
    embeds = _prompt_embeds(model, images, prompts)
    release()
    rows = [e.shape[1] for e in embeds]
    keep = np.zeros(sum(rows), dtype=bool)
    keep[np.random.default_rng(seed).choice(len(keep), size=min(SAMPLE_ROWS, len(keep)), replace=False)] = True
    base = model.language_model.get_decoder()
    layers = {index: _groups(layer) for index, layer in enumerate(base.layers)}
    groups = {(index, name): WeightGroup(f"layers.{index}.{name}", [],
                                         [f"{index}.{name}.{j}" for j in range(len(linears))])
              for index, named in layers.items() for name, linears in named.items()}
    chosen: list[np.ndarray] = []

    def record(key: tuple[int, str]) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            group = groups[key]
            magnitude = x.abs().sum(dim=0, dtype=torch.float64).numpy()
            group.abs_sum = magnitude if group.abs_sum is None else group.abs_sum + magnitude
            group.rows_seen += x.shape[0]
            if chosen[-1].any():
                # fp16 halves the sample (it only picks alpha): 0.9 GB for 8B's 128 groups x 512 rows
                group.sample.append(x[torch.from_numpy(chosen[-1])].to(torch.float16).numpy())
        return hook

    handles = [linears[0].register_forward_pre_hook(record((index, name)))
               for index, named in layers.items() for name, linears in named.items()]
    handles += [layer.register_forward_hook(lambda *_: release()) for layer in base.layers]
    try:
        offset = 0
        with torch.inference_mode():
            for sequence, count in zip(embeds, rows, strict=True):
                chosen.append(keep[offset:offset + count])
                offset += count
                base(inputs_embeds=sequence, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    statistics_s = time.perf_counter() - start
    logger.info("AWQ: statistics of %d prompts (%d tokens) in %.0f s", len(embeds), sum(rows), statistics_s)

    scales: dict[int, dict[str, np.ndarray]] = {}
    rtn_total = awq_total = 0.0
    for (index, name), group in groups.items():
        group.sample = [np.concatenate(group.sample).astype(np.float32)]
        weights = {f"{index}.{name}.{j}": linear.weight.detach().float().numpy().T
                   for j, linear in enumerate(layers[index][name])}
        ((_, alpha, found, rtn_error, awq_error),) = search_scales([group], weights, bits, block_size)
        del weights
        group.sample = []
        release()
        rtn_total, awq_total = rtn_total + rtn_error, awq_total + awq_error
        if alpha > 0:
            scales.setdefault(index, {})[name] = found
    summary = {"algorithm": "awq", "statistics": "torch decoder", "images": len(images), "prompt_tokens": sum(rows),
               "sample_rows": int(keep.sum()), "groups": len(groups),
               "groups_scaled": sum(len(g) for g in scales.values()),
               "output_error_ratio": round(awq_total / rtn_total, 4) if rtn_total else 1.0}
    logger.info("AWQ: %d of %d decoder groups scaled, searched in %.0f s", summary["groups_scaled"], len(groups),
                time.perf_counter() - start - statistics_s)
    return DecoderScales(scales, summary)

"""PyTorch -> ONNX, one component at a time, with `torch.onnx.export(dynamo=True)`.

Example inputs use sizes >= 2 on every dynamic axis: torch.export specialises axes traced at 0 or 1,
yet the exported graphs run with 1 tile, batch 1, one new token and an empty (length-0) past.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fundusrt.export.wrappers import ConnectorComponent, DecoderComponent, EmbedComponent, VisionComponent
from fundusrt.manifest import DecoderSpec
from fundusrt.models.lvlm import LVLM

OPSET = 18  # TensorRT 10.x (JetPack 6) parses opset <= 20; 18 covers everything the components use.
# Protobuf caps one file at 2 GiB; heavier components keep their weights in `<file>.data` beside it.
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass
class ComponentExport:
    """What to trace for one component."""

    module: nn.Module
    args: tuple[torch.Tensor | tuple[torch.Tensor, ...], ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_shapes: tuple[object, ...]


def decoder_spec(model: LVLM, max_seq_len: int) -> DecoderSpec:
    """The KV-cache geometry of `model`'s decoder."""
    text = model.config.text
    return DecoderSpec(num_layers=text.num_layers, num_kv_heads=text.num_kv_heads, head_dim=text.head_dim,
                       hidden_size=text.hidden_size, vocab_size=text.vocab_size, max_seq_len=max_seq_len)


def component_exports(model: LVLM) -> dict[str, ComponentExport]:
    """The four package components of `model` with example inputs and dynamic axes."""
    config, dtype = model.config, next(model.parameters()).dtype
    size, hidden = config.vision.image_size, config.text.hidden_size
    Dim = torch.export.Dim
    tiles, batch, seq, past_seq, total_seq = (Dim("num_tiles"), Dim("batch"), Dim("seq"), Dim("past_seq"),
                                              Dim("total_seq"))
    pixels = torch.randn(2, 3, size, size, dtype=dtype)
    with torch.no_grad():
        features = model.vision_features(pixels)

    spec = decoder_spec(model, max_seq_len=8)
    past_len, new_len, n_batch = 4, 3, 2
    past = tuple(torch.randn(n_batch, spec.num_kv_heads, past_len, spec.head_dim, dtype=dtype)
                 for _ in range(2 * spec.num_layers))
    past_names = [name % i for i in range(spec.num_layers) for name in (spec.past_key, spec.past_value)]
    present_names = [name % i for i in range(spec.num_layers) for name in (spec.present_key, spec.present_value)]
    return {
        "vision": ComponentExport(VisionComponent(model), (pixels,), ["pixel_values"], ["vision_features"],
                                  ({0: tiles},)),
        "connector": ComponentExport(ConnectorComponent(model), (features,), ["vision_features"], ["image_embeds"],
                                     ({0: tiles},)),
        "embed": ComponentExport(EmbedComponent(model, dtype), (torch.randint(0, spec.vocab_size, (n_batch, new_len)),),
                                 ["input_ids"], ["inputs_embeds"], ({0: batch, 1: seq},)),
        "decoder": ComponentExport(
            DecoderComponent(model),
            (torch.randn(n_batch, new_len, hidden, dtype=dtype),
             torch.ones(n_batch, past_len + new_len, dtype=torch.long),
             torch.arange(past_len, past_len + new_len).repeat(n_batch, 1), *past),
            ["inputs_embeds", "attention_mask", "position_ids", *past_names],
            ["logits", *present_names],
            ({0: batch, 1: seq}, {0: batch, 1: total_seq}, {0: batch, 1: seq},
             tuple({0: batch, 2: past_seq} for _ in past)),
        ),
    }


def export_component(component: ComponentExport, path: Path) -> list[Path]:
    """Trace `component` and write it at `path`; returns the files written (the graph, then any weights file).

    Components whose weights exceed EXTERNAL_DATA_BYTES store them in `path` + ".data".
    """
    weight_bytes = sum(p.numel() * p.element_size() for p in component.module.parameters())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    # The op registry warns once per torchvision op when torchvision is absent; our graphs use none.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings(), torch.no_grad():
        # The exporter warns when several inputs share one named axis, which is the intent here.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        program = torch.onnx.export(
            component.module.eval(), component.args, input_names=component.input_names,
            output_names=component.output_names, dynamic_shapes=component.dynamic_shapes, dynamo=True,
            opset_version=OPSET, optimize=True, verbose=False, external_data=False,
        )
    if program is None:
        raise RuntimeError(f"torch.onnx.export returned no program for {path.name}")
    program.save(str(path), external_data=external)
    data = path.with_name(path.name + ".data")
    return [path, data] if data.exists() else [path]

"""Decoders built by onnxruntime-genai's model builder: the graph ONNX Runtime runs fastest on a CPU.

`torch.onnx.export` gives a decoder of plain MatMuls whose KV cache is concatenated every step. The
builder (`onnxruntime_genai.models.builder`, the library ORT's own genai runtime uses) writes the
fused form instead: `MatMulNBits` weight-only INT4/INT8 (accuracy level 4: int8 dot products on
VNNI / NEON sdot), `GroupQueryAttention` over a KV buffer shared by past and present (written in
place), `SkipSimplifiedLayerNormalization` and rotary embedding fused. With `exclude_embeds` it takes
`inputs_embeds`, which is what splicing image features needs. It knows Qwen2, Llama (InternLM2 is
loaded as Llama by fundusrt) and Phi-3, the seed models' decoders.

What we add: the decoder of our loaded model written as a transformers checkpoint for it, the
builder run quietly in a temporary folder, its files renamed to the package's, and the I/O checked
against the runtime's contract (`fundusrt.manifest`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt._deps import require
from fundusrt.manifest import DecoderSpec, PackageError
from fundusrt.models.lvlm import LVLM

PRECISIONS = ("fp32", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DECODER_FILE = "decoder.onnx"


@dataclass(frozen=True)
class GenaiDecoderOptions:
    """How the builder writes the decoder.

    Attributes:
        precision: "int4" / "int8" (weight-only MatMulNBits, symmetric, round to nearest) or "fp32".
        block_size: weights per quantisation block.
        accuracy_level: MatMulNBits compute type; 4 = int8 activations x int8 weights (fastest on CPUs).
    """

    precision: str = "int4"
    block_size: int = 32
    accuracy_level: int = 4

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"decoder precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in (1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 1..4, got {self.accuracy_level}")

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this decoder."""
        quantised = self.precision != "fp32"
        return {
            "builder": f"onnxruntime-genai {metadata.version('onnxruntime-genai')}",
            "precision": self.precision,
            "flavour": ("MatMulNBits" if quantised else "MatMul") + "+GroupQueryAttention",
            **({"block_size": self.block_size, "accuracy_level": self.accuracy_level, "symmetric": True,
                "method": "rtn"} if quantised else {}),
        }


def _write_hf_decoder(model: LVLM, out: Path) -> None:
    """The decoder as a transformers checkpoint (config, safetensors, tokenizer) for the builder to read."""
    transformers = require("transformers", "building decoders with onnxruntime-genai")
    model.language_model.save_pretrained(out, safe_serialization=True)
    transformers.PreTrainedTokenizerFast(tokenizer_object=model.tokenizer).save_pretrained(out)


def _check_io(path: Path, spec: DecoderSpec) -> None:
    onnx = require("onnx", "building decoders with onnxruntime-genai")
    graph = onnx.load(str(path), load_external_data=False).graph
    inputs, outputs = {v.name for v in graph.input}, {v.name for v in graph.output}
    layers = range(spec.num_layers)
    want_in = {"inputs_embeds", "attention_mask", *(t % i for i in layers for t in (spec.past_key, spec.past_value))}
    want_out = {"logits", *(t % i for i in layers for t in (spec.present_key, spec.present_value))}
    if not want_in <= inputs or not want_out <= outputs:
        raise PackageError(f"the onnxruntime-genai decoder lacks inputs {sorted(want_in - inputs)} / outputs "
                           f"{sorted(want_out - outputs)} the runtime needs; this builder version is not supported")


def _logits_of_last_position(path: Path) -> None:
    """Make the builder's decoder compute logits for the last position only, as the runtime's contract says.

    The builder's graph projects every prompt position onto the vocabulary (151,674 x 896 per position for
    Qwen2.5-0.5B: about a quarter of a 300-token prefill) though only the last is ever read. A Slice of the
    hidden states before the LM head removes that work. The graph is left as it is when the logits do not
    come straight from a MatMul (the runtime reads the last row either way).
    """
    onnx = require("onnx", "building decoders with onnxruntime-genai")
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    head = next((node for node in graph.node if "logits" in node.output), None)
    if head is None or head.op_type not in ("MatMul", "MatMulNBits"):
        return
    hidden, last = head.input[0], f"{head.input[0]}/last_position"
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_position/starts"),
        onnx.numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "last_position/ends"),
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "last_position/axes"),
    ])
    index = list(graph.node).index(head)
    graph.node.insert(index, onnx.helper.make_node(
        "Slice", [hidden, "last_position/starts", "last_position/ends", "last_position/axes"], [last],
        name="/lm_head/last_position"))
    head.input[0] = last
    logits = next(value for value in graph.output if value.name == "logits")
    logits.type.tensor_type.shape.dim[1].Clear()
    logits.type.tensor_type.shape.dim[1].dim_value = 1
    onnx.save(model, str(path))  # the weights stay in their external-data file, untouched


def build_genai_decoder(model: LVLM, staging: Path, spec: DecoderSpec, options: GenaiDecoderOptions) -> list[Path]:
    """Write `decoder.onnx` (+ `decoder.onnx.data`) into `staging`; returns the files, graph first.

    Raises:
        MissingDependencyError: onnxruntime-genai (fundusrt[export]) is not installed.
        PackageError: the builder's graph does not have the runtime's inputs and outputs.
    """
    require("onnxruntime_genai", "building decoders with onnxruntime-genai")
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    # ORT's weight quantizer calls logging.basicConfig(level=INFO) on import, which would make every later
    # library log line print; the process's logging is put back as it was.
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    root.handlers[:], root.level = handlers, root_level

    # hf_token=false: everything is local; the builder must never look for (or send) a Hub token.
    extra = ["exclude_embeds=true", f"filename={DECODER_FILE}", "hf_token=false"]
    if options.precision != "fp32":
        extra += [f"block_size={options.block_size}", f"accuracy_level={options.accuracy_level}", "is_symmetric=true"]
    with tempfile.TemporaryDirectory(dir=staging, prefix=".genai.") as tmp:
        hf, out, cache = Path(tmp) / "hf", Path(tmp) / "out", Path(tmp) / "cache"
        # transformers and the builder print options and progress bars; an export prints one line, the package path.
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                _write_hf_decoder(model, hf)
                parsed = parse_extra_options(None, str(hf), str(out), options.precision, "cpu", str(cache), extra)
                create_model(None, str(hf), str(out), options.precision, "cpu", str(cache), **parsed)
        except Exception as exc:  # the builder raises bare Exceptions with its reason
            raise PackageError(f"onnxruntime-genai could not build the {options.precision} decoder: {exc}\n"
                               f"{chatter.getvalue()[-2000:]}") from exc
        graph = out / DECODER_FILE
        _check_io(graph, spec)
        _logits_of_last_position(graph)
        files = [graph, *sorted(p for p in out.iterdir() if p.name.startswith(f"{DECODER_FILE}."))]
        moved = []
        for file in files:
            moved.append(file.rename(staging / file.name))
    return moved

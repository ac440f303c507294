"""Decoders built by onnxruntime-genai's model builder: the graph ONNX Runtime runs fastest on a CPU.

`torch.onnx.export` gives a decoder of plain MatMuls whose KV cache is concatenated every step. The
builder (`onnxruntime_genai.models.builder`, the library ORT's own genai runtime uses) writes the
fused form instead: `MatMulNBits` weight-only INT4/INT8 (accuracy level 4: int8 dot products on
VNNI / NEON sdot), `GroupQueryAttention` over a KV buffer shared by past and present (written in
place), `SkipSimplifiedLayerNormalization` and rotary embedding fused. With `exclude_embeds` it takes
`inputs_embeds`, which is what splicing image features needs. It knows Qwen2, Llama (InternLM2 is
loaded as Llama by fundusrt) and Phi-3, the seed models' decoders.

What we add: the builder is handed our loaded decoder (memory-mapped from the checkpoint, never
copied into a transformers checkpoint) and writes its graph, but we write the weights: the builder's
own save converts the whole graph to one in-memory protobuf in fp32 before quantising it (about 30 GB
for a 7B decoder), so an 8B model could not be exported on a 24-32 GB machine. Ours streams: each
MatMul weight is cast, quantised with the same ORT (MLAS) quantiser the builder uses, written to
external data and dropped, one tensor at a time; with AWQ scales (`awq_scales`) each weight is scaled
as it is read and the inverses go into the norms, the up projections and Muls before o_proj. Then the
I/O is checked against the runtime's contract (`fundusrt.manifest`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fundusrt._deps import require
from fundusrt.manifest import DecoderSpec, PackageError
from fundusrt.models.lvlm import LVLM

if TYPE_CHECKING:
    from fundusrt.calibration.awq_decoder import DecoderScales

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "int4")
BLOCK_SIZES = (16, 32, 64, 128, 256)
DECODER_FILE = "decoder.onnx"


@dataclass(frozen=True)
class GenaiDecoderOptions:
    """How the builder writes the decoder.

    Attributes:
        precision: "int4" / "int8" (weight-only MatMulNBits, symmetric, rounded to nearest after any AWQ
            scaling) or "fp32".
        block_size: weights per quantisation block.
        accuracy_level: MatMulNBits compute type; 4 = int8 activations x int8 weights (fastest on CPUs).
        awq_images: DICOM files, study folders or image files whose activations pick AWQ scales for the
            int4/int8 weights (`fundusrt.calibration.awq_decoder`); empty: plain round to nearest.
        awq_prompts: the questions asked of them (a `fundusrt calibrate --prompts` file; default: the
            checkpoint's default questions plus the standard MCQs).
        awq_max_images: the most images AWQ reads.
    """

    precision: str = "int4"
    block_size: int = 128
    accuracy_level: int = 4
    awq_images: tuple[str, ...] = ()
    awq_prompts: str | None = None
    awq_max_images: int = 16

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"decoder precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in (1, 2, 3, 4):
            raise ValueError(f"accuracy_level must be 1..4, got {self.accuracy_level}")
        if self.awq_images and self.precision == "fp32":
            raise ValueError("AWQ scales weights for rounding; an fp32 decoder is not rounded (drop the AWQ images "
                             "or choose int4/int8)")
        if self.awq_max_images < 1:
            raise ValueError(f"awq_max_images must be >= 1, got {self.awq_max_images}")

    def describe(self, awq: dict[str, Any] | None = None) -> dict[str, Any]:
        """What the manifest records about this decoder (`awq`: the scale search's summary, if it ran)."""
        quantised = self.precision != "fp32"
        return {
            "builder": f"onnxruntime-genai {metadata.version('onnxruntime-genai')}",
            "precision": self.precision,
            "flavour": ("MatMulNBits" if quantised else "MatMul") + "+GroupQueryAttention",
            **({"block_size": self.block_size, "accuracy_level": self.accuracy_level, "symmetric": True,
                "method": "awq" if awq else "rtn"} if quantised else {}),
            **({"awq": awq} if awq else {}),
        }


def awq_scales(model: LVLM, options: GenaiDecoderOptions) -> DecoderScales | None:
    """The AWQ scales for `options.awq_images` (None without images); run before the vision tower is released.

    Unreadable files are skipped with a warning, as `fundusrt calibrate` does; none readable is an error.
    """
    if not options.awq_images:
        return None
    from fundusrt.calibration.awq_decoder import search_decoder_scales
    from fundusrt.calibration.dataset import (
        CalibrationError,
        SourceImage,
        iter_source_images,
        load_prompts,
        source_files,
    )

    try:
        decoded = iter_source_images(source_files(options.awq_images))
        images = []
        for item in decoded:
            if isinstance(item, SourceImage):
                images.append(item)
            else:
                logger.warning("AWQ skips %s: %s", *item)
            if len(images) == options.awq_max_images:
                break
        prompts = load_prompts(options.awq_prompts, model.config.default_questions)
        mapped = getattr(model, "mapped_weights", None)
        return search_decoder_scales(model, images, prompts, bits=int(options.precision[3:]),
                                     block_size=options.block_size,
                                     release=mapped.release if mapped is not None else lambda: None)
    except CalibrationError as exc:
        raise PackageError(f"AWQ for the {options.precision} decoder: {exc}") from exc


def _write_hf_config(model: LVLM, out: Path) -> None:
    """The decoder's transformers config and tokenizer (no weights) for the builder to read."""
    transformers = require("transformers", "building decoders with onnxruntime-genai")
    config = copy.deepcopy(model.language_model.config)
    config.architectures = [type(model.language_model).__name__]  # what the builder dispatches on
    config.save_pretrained(out)
    transformers.PreTrainedTokenizerFast(tokenizer_object=model.tokenizer).save_pretrained(out)


class _StreamedQuantiser:
    """MatMul -> MatMulNBits with weights quantised when they are written, not before.

    The packed weight and its scales are two initializers computed together: the pair is quantised on
    the first read and dropped after the second, so one weight is in memory at a time.
    """

    def __init__(self, quant_attrs: dict[str, Any]) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        self.bits, self.block_size = quant_attrs["bits"], quant_attrs["matmul_block_size"]
        self.accuracy_level = quant_attrs["accuracy_level"]
        self.op_types = tuple(quant_attrs["op_types_to_quantize"])
        self.excluded = set(quant_attrs["nodes_to_exclude"])
        # The quantiser the builder's own save runs (MLAS C++ kernels), so the bytes are the same.
        self.quantizer = DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(
            block_size=self.block_size, is_symmetric=True, accuracy_level=self.accuracy_level,
            op_types_to_quantize=self.op_types, bits=self.bits))
        self._pending: dict[str, dict[str, np.ndarray]] = {}

    def _quantise(self, weight: np.ndarray, columns: int = 4096) -> dict[str, np.ndarray]:
        """Packed blocks and scales of a (K, N) weight, a slice of N at a time: MLAS wants a contiguous fp32
        matrix, and a whole contiguous copy of an LM head would be another 1.5 GB for an 8B model."""
        n = weight.shape[1]
        parts = [self.quantizer.qbits_block_quant(np.ascontiguousarray(weight[:, i:i + columns], dtype=np.float32))
                 for i in range(0, n, columns)]
        return {"packed": np.concatenate([p[0] for p in parts]), "scales": np.concatenate([p[1] for p in parts])}

    def _part(self, weight: Any, name: str, part: str) -> Any:
        import onnx_ir as ir

        if name not in self._pending:
            self._pending[name] = self._quantise(weight.numpy())
        parts = self._pending[name]
        array = parts.pop(part)
        if not parts:
            del self._pending[name]
        return ir.Tensor(array, name=f"{name}_{part}")

    def rewrite(self, model: Any) -> None:
        """Replace every eligible MatMul of `model` (an onnx_ir Model) by a lazily quantised MatMulNBits."""
        import onnx_ir as ir

        graph = model.graph
        for node in list(graph):
            if node.op_type != "MatMul" or "MatMul" not in self.op_types or node.name in self.excluded:
                continue
            weight_value = node.inputs[1]
            weight = weight_value.const_value if weight_value is not None else None
            if weight is None or len(weight.shape) != 2:
                continue
            k, n = (int(d) for d in weight.shape)
            k_blocks = -(-k // self.block_size)
            blob = self.block_size * self.bits // 8
            name = weight_value.name
            packed = ir.LazyTensor(lambda w=weight, nm=name: self._part(w, nm, "packed"), dtype=ir.DataType.UINT8,
                                   shape=ir.Shape([n, k_blocks, blob]), name=f"{name}_Q{self.bits}")
            scales = ir.LazyTensor(lambda w=weight, nm=name: self._part(w, nm, "scales"), dtype=ir.DataType.FLOAT,
                                   shape=ir.Shape([n, k_blocks]), name=f"{name}_scales")
            inputs = [node.inputs[0]]
            for tensor in (packed, scales):
                value = ir.Value(name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype),
                                 const_value=tensor)
                graph.register_initializer(value)
                inputs.append(value)
            attributes = {"K": k, "N": n, "bits": self.bits, "block_size": self.block_size}
            if self.accuracy_level:
                attributes["accuracy_level"] = self.accuracy_level
            replacement = ir.node("MatMulNBits", inputs, attributes, domain="com.microsoft",
                                  name=f"{node.name}_Q{self.bits}", num_outputs=1)
            ir.convenience.replace_nodes_and_values(graph, node, [node], [replacement], node.outputs,
                                                    replacement.outputs)
            if not weight_value.uses():
                graph.initializers.pop(name)
        model.opset_imports.setdefault("com.microsoft", 1)


# Where the scales of each AWQ group (the group names of `fundusrt.calibration.awq_decoder`) go in the
# builder's graph, by the initializer names it gives (its basenames "/model/layers.{i}/attn/qkv_proj/MatMul"
# etc.): the weights whose input rows are multiplied, and the initializer that takes the inverse (a norm's
# weight, divided; the up projection's output columns; None: a Mul inserted before the weights' MatMul).
_AWQ_TARGETS = {
    "attention": (("attn.qkv_proj", "attn.q_proj", "attn.k_proj", "attn.v_proj"), "input_layernorm.weight"),
    "output": (("attn.o_proj",), None),
    "mlp": (("mlp.gate_proj", "mlp.up_proj", "mlp.gate_up_proj"), "post_attention_layernorm.weight"),
    "down": (("mlp.down_proj",), "mlp.up_proj.MatMul.weight"),
}


@dataclass
class _Transform:
    """What AWQ does to one initializer: input rows multiplied, output columns divided, or a vector divided."""

    rows: np.ndarray | None = None
    columns: np.ndarray | None = None
    divide: np.ndarray | None = None

    def __call__(self, array: np.ndarray) -> np.ndarray:
        out = array.astype(np.float32)  # MatMul weights are (K, N)
        if self.divide is not None:
            out = out / self.divide
        if self.rows is not None:
            out = out * self.rows[:, None]
        if self.columns is not None:
            out = out / self.columns[None, :]
        return out.astype(array.dtype)


def _awq_plan(scales: DecoderScales, names: set[str]) -> tuple[dict[str, _Transform], dict[str, np.ndarray]]:
    """The transform of each initializer AWQ touches in the builder graph whose initializers are `names`, and
    the weights whose MatMul input is to be divided by an inserted Mul.

    Every group must find its weights and its inverse's home, or the export stops: a scaled weight
    without its inverse would be a different model.
    """
    plan: dict[str, _Transform] = {}
    divided_inputs: dict[str, np.ndarray] = {}
    for layer, groups in scales.layers.items():
        prefix = f"model.layers.{layer}."
        for group, s in groups.items():
            weights, inverse = _AWQ_TARGETS[group]
            found = [name for w in weights if (name := f"{prefix}{w}.MatMul.weight") in names]
            if not found or (inverse is not None and prefix + inverse not in names):
                raise PackageError(f"AWQ: the builder's graph has no {group} weights or no {inverse} in layer "
                                   f"{layer}; this builder version names them differently: export without AWQ")
            for name in found:
                plan.setdefault(name, _Transform()).rows = s
            if inverse is None:
                divided_inputs.update(dict.fromkeys(found, s))
            elif group == "down":
                plan.setdefault(prefix + inverse, _Transform()).columns = s
            else:
                plan.setdefault(prefix + inverse, _Transform()).divide = s
    return plan, divided_inputs


def _apply_awq(model: Any, scales: DecoderScales) -> None:
    """Put each AWQ transform between an initializer and its reader: applied when the weight is read, so the
    quantiser still holds one weight at a time."""
    import onnx_ir as ir

    graph = model.graph
    plan, divided_inputs = _awq_plan(scales, set(graph.initializers))
    for name, transform in plan.items():
        value = graph.initializers[name]
        tensor = value.const_value
        value.const_value = ir.LazyTensor(lambda t=tensor, f=transform: ir.Tensor(f(t.numpy()), name=t.name),
                                          dtype=tensor.dtype, shape=tensor.shape, name=tensor.name)
    for name, s in divided_inputs.items():
        (matmul, _), = graph.initializers[name].uses()
        activation = matmul.inputs[0]
        inverse = ir.Value(name=f"{name}.awq_inverse_scale", shape=ir.Shape(s.shape),
                           type=ir.TensorType(activation.dtype),
                           const_value=ir.Tensor((1.0 / s).astype(activation.dtype.numpy())))
        graph.register_initializer(inverse)
        mul = ir.node("Mul", [activation, inverse], name=f"{matmul.name}/awq_inverse_scale")
        graph.insert_before(matmul, mul)
        matmul.replace_input_with(0, mul.outputs[0])


def _streamed_save(builder: Any, out_dir: str, release: Callable[[], None], scales: DecoderScales | None) -> None:
    """The builder's `save_model`, with weights (AWQ-scaled when `scales`) cast, quantised and written one at a time."""
    import onnx_ir as ir

    model = builder.model
    if scales is not None:
        _apply_awq(model, scales)
    if builder.onnx_dtype in {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}:
        _StreamedQuantiser(builder.quant_attrs).rewrite(model)
    model.graph.sort()
    builder.stamp_build_metadata(model)
    out_path = Path(out_dir) / builder.filename
    # Dropping the checkpoint's mapped pages after each tensor keeps the resident set at one weight.
    ir.save(model, str(out_path), external_data=out_path.name + ".data", size_threshold_bytes=0,
            callback=lambda _tensor, _info: release())


@contextlib.contextmanager
def _builder_streams(decoder: Any, release: Callable[[], None], scales: DecoderScales | None) -> Iterator[None]:
    """While active, the builder takes `decoder` as the model it reads and saves with `_streamed_save`.

    The builder offers no hook for weights that are already loaded or that must not be held twice,
    so its two methods are replaced for the duration of one `create_model` call.
    """
    # The builder imports its modules under their own top-level names: patch the class it really uses.
    from onnxruntime_genai.models.builder import Model

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(Model, "load_weights", lambda _self, _path: decoder))
        stack.enter_context(_patched(Model, "save_model", lambda self, out: _streamed_save(self, out, release, scales)))
        yield


@contextlib.contextmanager
def _patched(owner: type, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    original = owner.__dict__[name]
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


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


def build_genai_decoder(model: LVLM, staging: Path, spec: DecoderSpec, options: GenaiDecoderOptions,
                        scales: DecoderScales | None = None) -> list[Path]:
    """Write `decoder.onnx` (+ `decoder.onnx.data`) into `staging`; returns the files, graph first.

    `scales` (from `awq_scales`) are applied to the weights before they are rounded (an fp32 decoder with
    scales computes what it computes without them: the float identity AWQ rests on).

    The decoder's weights are read from `model` one tensor at a time; when `model` was loaded with its
    weights memory-mapped (`fundusrt.models.load`), their pages are dropped as each one is written.

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
    mapped = getattr(model, "mapped_weights", None)
    release = mapped.release if mapped is not None else (lambda: None)
    if options.precision != "fp32":
        extra += [f"block_size={options.block_size}", f"accuracy_level={options.accuracy_level}", "is_symmetric=true"]
    with tempfile.TemporaryDirectory(dir=staging, prefix=".genai.") as tmp:
        hf, out, cache = Path(tmp) / "hf", Path(tmp) / "out", Path(tmp) / "cache"
        # transformers and the builder print options and progress bars; an export prints one line, the package path.
        chatter = io.StringIO()
        try:
            with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
                _write_hf_config(model, hf)
                parsed = parse_extra_options(None, str(hf), str(out), options.precision, "cpu", str(cache), extra)
                with _builder_streams(model.language_model, release, scales):
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

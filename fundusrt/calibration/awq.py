"""Activation-aware weight scaling (AWQ) for the weight-only INT4/INT8 decoders.

Round-to-nearest block quantisation treats every input channel of a weight alike, yet a few input
channels carry much larger activations than the rest, and their weights' rounding errors dominate the
output error (Lin et al., "AWQ", MLSys 2024). AWQ multiplies each input channel's weights by a scale s
before rounding and divides the activation by s, which leaves the float product unchanged:
X W = (X / s) (s W). Channels with large activations get s > 1, so their weights use more of the grid.

Per group of MatMuls that read one activation (q/k/v after the attention norm, gate/up after the MLP
norm, down after the gated product, o after attention), s = mean|x| ** alpha, normalised, and alpha is
searched on a grid to minimise the group's output error against the float product, with the rounding
the quantiser will apply. 1/s is then folded into the op that made the activation where that is exact
(the norm's weight; the up projection's output columns for down), else a Mul is inserted before the
group. The quantiser (ORT's MatMulNBitsQuantizer) then rounds the scaled weights as usual, so the
graph flavour (MatMulNBits or block-quantised DequantizeLinear) is unchanged.

Written here rather than taken from a library: AutoAWQ is archived, llm-compressor writes vLLM's
compressed-tensors checkpoints from a whole torch model, and ORT's `nvidia_awq` needs NVIDIA ModelOpt
and downloads its own calibration text; none of them takes our recorded calibration set (spliced image
and prompt embeddings) or works on an exported ONNX decoder on a CPU.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

# alpha = 0 (no scaling, plain RTN) is on the grid, so the search never does worse than RTN on its set
ALPHA_GRID = tuple(i / 20 for i in range(20))
# rows of each group's input kept to measure output errors on (a seeded uniform sample over the set)
SAMPLE_ROWS = 512
# ops through which a MatMul's output may reach the logits output and still count as the LM head
_PASS_THROUGH = {"Cast", "Reshape", "Identity", "Squeeze", "Unsqueeze"}


def fake_quantise(weight: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """`weight` (K, N) rounded as ORT's symmetric block quantiser does, then dequantised.

    Blocks run along K per output column. As in MLAS, each block's extreme value (the minimum when
    |min| >= |max|) maps to the grid's negative end (-8 for 4 bits, -128 for 8), so the grid's one extra
    negative step is used. Two reductions and in-place rounding: the search calls this 20 times per weight.
    """
    k, n = weight.shape
    blocks = np.pad(weight, ((0, -k % block_size), (0, 0))).reshape(-1, block_size, n)
    high, low_value = blocks.max(axis=1, keepdims=True), blocks.min(axis=1, keepdims=True)
    low = -(2 ** (bits - 1))
    scale = np.where(np.abs(high) > np.abs(low_value), high, low_value) / low
    scale[scale == 0] = 1.0
    quantised = blocks / scale
    np.rint(quantised, out=quantised)
    np.clip(quantised, low, -low - 1, out=quantised)
    quantised *= scale
    return quantised.reshape(-1, n)[:k]


@dataclass
class WeightGroup:
    """MatMuls with constant weights that read one activation tensor."""

    activation: str
    nodes: list[Any]
    weights: list[str]
    abs_sum: np.ndarray | None = None
    rows_seen: int = 0
    sample: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class GroupScale:
    """The search's result for one group: alpha (0: left as it was), the sample's output error with plain
    rounding and with the chosen scales, and the op the inverse scale went into ("none": an inserted Mul)."""

    alpha: float
    rtn_error: float
    awq_error: float
    folded_into: str


def _lm_head_outputs(graph: Any) -> set[str]:
    producers = {out: node for node in graph.node for out in node.output}
    heads, frontier = set(), [o.name for o in graph.output]
    while frontier:
        name = frontier.pop()
        node = producers.get(name)
        if node is None:
            continue
        if node.op_type in _PASS_THROUGH:
            frontier.append(node.input[0])
        elif node.op_type == "MatMul":
            heads.add(node.output[0])
    return heads


def weight_groups(model: Any) -> list[WeightGroup]:
    """The groups AWQ scales: constant 2-D weight MatMuls by shared input, the LM head left out.

    The LM head is left to plain rounding, as AWQ does: its input is the final norm's and its error
    is read directly as logits, where the gate checks it.
    """
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    heads = _lm_head_outputs(graph)
    groups: dict[str, WeightGroup] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in initializers or node.output[0] in heads:
            continue
        if len(initializers[node.input[1]].dims) != 2:
            continue
        group = groups.setdefault(node.input[0], WeightGroup(node.input[0], [], []))
        group.nodes.append(node)
        group.weights.append(node.input[1])
    return list(groups.values())


def collect_activations(model: Any, groups: Sequence[WeightGroup], feeds: Sequence[dict[str, np.ndarray]],
                        seed: int = 0) -> None:
    """Run the float decoder over the recorded feeds and keep, per group input, mean |x| and a row sample.

    The sampled rows (token positions) are drawn once, the same for every group, so that groups are
    judged on the same tokens and only the sample is ever held, not every activation of the set.
    """
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for group in groups:
        if group.activation not in known:
            probe.graph.output.append(onnx.helper.make_tensor_value_info(group.activation, onnx.TensorProto.FLOAT,
                                                                         None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), sess_options=options,
                                   providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    rows_per_feed = [int(np.prod(feed["inputs_embeds"].shape[:-1])) for feed in feeds]
    total = sum(rows_per_feed)
    keep = np.zeros(total, dtype=bool)
    keep[np.random.default_rng(seed).choice(total, size=min(SAMPLE_ROWS, total), replace=False)] = True
    names = [g.activation for g in groups]
    offset = 0
    for feed, count in zip(feeds, rows_per_feed, strict=True):
        values = session.run(names, {k: v for k, v in feed.items() if k in inputs})
        chosen = keep[offset:offset + count]
        offset += count
        for group, value in zip(groups, values, strict=True):
            rows = value.reshape(-1, value.shape[-1]).astype(np.float32)
            if len(rows) != count:
                raise ValueError(f"AWQ expects one row per token at {group.activation}, got {len(rows)} rows for "
                                 f"{count} tokens; quantise this decoder without --awq")
            magnitude = np.abs(rows).sum(axis=0)
            group.abs_sum = magnitude if group.abs_sum is None else group.abs_sum + magnitude
            group.rows_seen += len(rows)
            if chosen.any():
                group.sample.append(rows[chosen])
    for group in groups:
        group.sample = [np.concatenate(group.sample)]


def _error(x: np.ndarray, weights: Sequence[np.ndarray], references: Sequence[np.ndarray], scales: np.ndarray,
           bits: int, block_size: int) -> float:
    scaled_x = x / scales
    total = 0.0
    for weight, reference in zip(weights, references, strict=True):
        out = scaled_x @ fake_quantise(weight * scales[:, None], bits, block_size)
        total += float(np.mean((out - reference) ** 2))
    return total


def search_scales(groups: Sequence[WeightGroup], initializers: dict[str, np.ndarray], bits: int,
                  block_size: int) -> list[tuple[WeightGroup, float, np.ndarray, float, float]]:
    """Per group: (group, best alpha, scales, RTN output error, scaled output error) on the row sample."""
    results = []
    for group in groups:
        x = group.sample[0]
        mean = np.maximum(group.abs_sum / max(group.rows_seen, 1), 1e-8)
        weights = [initializers[name] for name in group.weights]
        references = [x @ w for w in weights]
        best = (0.0, np.ones_like(mean), _error(x, weights, references, np.ones_like(mean), bits, block_size))
        rtn_error = best[2]
        for alpha in ALPHA_GRID[1:]:
            scales = mean ** alpha
            scales = scales / np.sqrt(scales.max() * scales.min())  # keeps the scales around 1 (as AWQ does)
            error = _error(x, weights, references, scales, bits, block_size)
            if error < best[2]:
                best = (alpha, scales, error)
        results.append((group, best[0], best[1].astype(np.float32), rtn_error, best[2]))
    return results


def apply_awq(model: Any, feeds: Sequence[dict[str, np.ndarray]], bits: int, block_size: int) -> list[GroupScale]:
    """Scale `model`'s weight MatMuls in place for `bits`-bit block-`block_size` rounding; return what was done.

    The float model computes the same function afterwards (up to fp32 rounding): each group's weights
    are multiplied by s per input channel and its input divided by s.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    arrays = _Arrays(initializers)
    groups = weight_groups(model)
    if not groups:
        return []
    collect_activations(model, groups, feeds)
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def replace(name: str, value: np.ndarray) -> None:
        initializers[name].CopyFrom(numpy_helper.from_array(value.astype(arrays[name].dtype), name))
        arrays[name] = value

    results = []
    inserted = []
    for group, alpha, scales, rtn_error, awq_error in search_scales(groups, arrays, bits, block_size):
        folded = "none"
        if alpha > 0:
            for node, weight in zip(group.nodes, group.weights, strict=True):
                if len(consumers[weight]) != 1:  # a weight read elsewhere too keeps its values there
                    new = f"{weight}.awq"
                    graph.initializer.append(numpy_helper.from_array(arrays[weight], new))
                    initializers[new], arrays[new] = graph.initializer[-1], arrays[weight]
                    node.input[1], weight = new, new
                replace(weight, arrays[weight] * scales[:, None])
            folded = _fold_inverse(group, scales, producers, consumers, initializers, arrays, replace)
            if folded == "none":
                inserted.append((group, scales))
        results.append(GroupScale(alpha, rtn_error, awq_error, folded))
    for group, scales in inserted:
        _insert_mul(graph, group, scales)
    improved = sum(r.awq_error < r.rtn_error for r in results)
    logger.info("AWQ: %d of %d MatMul groups scaled", improved, len(results))
    return results


class _Arrays(dict):
    """Initializer values as numpy, converted on first use: only the weights of MatMul groups and the ops
    their inverse scales fold into are ever read, not (say) the embedding table."""

    def __init__(self, initializers: dict[str, Any]) -> None:
        super().__init__()
        self._initializers = initializers

    def __missing__(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        value = self[name] = numpy_helper.to_array(self._initializers[name])
        return value


def _fold_inverse(group: WeightGroup, scales: np.ndarray, producers: dict[str, Any], consumers: dict[str, list[Any]],
                  initializers: dict[str, Any], arrays: dict[str, np.ndarray],
                  replace: Any) -> str:
    """Divide the group's input by `scales` inside the op that makes it, where that is exact; name that op."""
    producer = producers.get(group.activation)
    if producer is None or producer.op_type != "Mul":
        return "none"
    if {id(n) for n in consumers[group.activation]} != {id(n) for n in group.nodes}:
        return "none"  # the activation is also read unscaled elsewhere (a residual, say)
    k = scales.shape[0]
    for name in producer.input:
        # a norm's weight: x * w -> x * (w / s)
        if name in initializers and arrays[name].shape == (k,) and len(consumers[name]) == 1:
            replace(name, arrays[name] / scales)
            return producer.name
    for name in producer.input:
        # a gated product act(gate) * up: divide the up projection's output columns
        maker = producers.get(name)
        if (maker is not None and maker.op_type == "MatMul" and maker.input[1] in initializers
                and arrays[maker.input[1]].shape[-1] == k and len(consumers[maker.input[1]]) == 1
                and len(consumers[name]) == 1):
            replace(maker.input[1], arrays[maker.input[1]] / scales[None, :])
            return maker.name
    return "none"


def _insert_mul(graph: Any, group: WeightGroup, scales: np.ndarray) -> None:
    from onnx import helper, numpy_helper

    inverse = f"{group.activation}.awq_inverse_scale"
    scaled = f"{group.activation}.awq_scaled"
    graph.initializer.append(numpy_helper.from_array((1.0 / scales).astype(np.float32), inverse))
    mul = helper.make_node("Mul", [group.activation, inverse], [scaled], name=f"{group.activation}.awq_mul")
    position = min(list(graph.node).index(node) for node in group.nodes)
    graph.node.insert(position, mul)
    for node in group.nodes:
        node.input[0] = scaled


def summary(results: Sequence[GroupScale]) -> dict[str, Any]:
    """What the manifest records: groups scaled, where the inverse went, and the sample's error ratio."""
    rtn = sum(r.rtn_error for r in results)
    awq = sum(r.awq_error for r in results)
    scaled = [r for r in results if r.alpha > 0]
    return {"algorithm": "awq", "alpha_grid": len(ALPHA_GRID), "sample_rows": SAMPLE_ROWS,
            "groups": len(results), "groups_scaled": len(scaled),
            "folded": sum(r.folded_into != "none" for r in scaled),
            "inserted_mul": sum(r.folded_into == "none" for r in scaled),
            "output_error_ratio": round(awq / rtn, 4) if rtn else 1.0}


def compare_decoders(reference: Path, candidate: Path, feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """How far `candidate`'s last-position logits are from `reference`'s over recorded decoder feeds.

    Returns the mean KL divergence KL(reference || candidate) of the next-token distributions, the mean
    cosine of the logits, and the share of feeds whose top-1 token agrees.
    """
    import onnxruntime as ort

    sessions = [ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]) for path in (reference, candidate)]
    kl, cos, top1 = [], [], []
    for feed in feeds:
        ref, cand = (_last_logits(session.run(["logits"], feed)[0]) for session in sessions)
        log_p, log_q = ref - np.logaddexp.reduce(ref), cand - np.logaddexp.reduce(cand)
        kl.append(float(np.sum(np.exp(log_p) * (log_p - log_q))))
        cos.append(float(ref @ cand / (np.linalg.norm(ref) * np.linalg.norm(cand))))
        top1.append(float(ref.argmax() == cand.argmax()))
    return {"kl": float(np.mean(kl)), "cosine": float(np.mean(cos)), "top1": float(np.mean(top1)),
            "feeds": len(feeds)}


def _last_logits(logits: np.ndarray) -> np.ndarray:
    return logits.reshape(-1, logits.shape[-1])[-1].astype(np.float64)

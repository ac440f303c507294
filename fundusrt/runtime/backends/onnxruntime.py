"""ONNX Runtime backend (CPU, CUDA and TensorRT execution providers).

Sessions are created once per package with full graph optimisation. The decoder's KV cache lives in
ORT values between steps, through IO binding:

- in place (`decoder.kv_cache == "shared"`, the GroupQueryAttention decoders onnxruntime-genai builds):
  one buffer per layer and K/V, preallocated to max_seq_len, bound as both past input and present
  output, so each step writes only its new positions and nothing is reallocated or copied. `fork()`
  copies the held positions into new buffers (a fork's steps write into them); the positions not yet
  written are zero pages the OS maps only when a step writes them, so a buffer's resident size grows
  with its sequence, not with max_seq_len.
- zero-copy (`"concat"`, decoders exported by torch): each step's `present.*` outputs are bound as the
  next step's `past_key_values.*` inputs without leaving ORT (on CUDA they stay on the GPU). Past values
  are never written to (every step allocates its presents from ORT's arena), so `fork()` shares them.
- In `decode` the embed session's output is bound straight into the decoder.
- `continuation_logits` (the options of a scored question) runs one row per continuation in each
  decoder call, one token of each row per call (both decoder flavours return the last position's
  logits only). The rows' cache is built once from this session's: the past repeated per row
  ("concat"), or temporary in-place buffers of rows x (seq_len + longest) positions holding the prefix
  ("shared"; not rows x max_seq_len: GroupQueryAttention takes the buffer length from the past's
  shape). The prefix goes through the host once per layer for this copy. Finished rows leave the batch
  by binding only the leading rows of the cache (by pointer), so nothing is padded or copied again.
  fp32 decoders give each row the logits of a batch-1 step; int8/int4 MatMulNBits decoders take another
  kernel path for several rows, so their logits differ by that kernel's rounding (measured: as close
  to fp32 as a batch-1 step's).
- With the CUDA providers, images are patchified on the GPU by fundusrt's CUDA kernels and the vision
  session reads the tiles by device pointer (IO binding): no host round trip for pixels.
- copied: the prompt embeddings in `prefill` (host -> device once per prompt), the token id, mask and
  positions of each step (a few bytes), and the logits back to numpy (vocab floats per position).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt._deps import require
from fundusrt.manifest import ComponentSpec, DecoderSpec, Manifest, PackageError
from fundusrt.runtime.backends import prepacked
from fundusrt.runtime.backends.base import BackendError, PackageSessions, check_continuations
from fundusrt.runtime.backends.profiles import with_trt_profiles

ort = require("onnxruntime", "the ONNX Runtime backend")

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
_DEVICE_FOR_PROVIDER = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
# Decoder inputs/outputs that are not KV (the exporter's names, see fundusrt.manifest).
_EMBEDS, _MASK, _POSITIONS, _LOGITS = "inputs_embeds", "attention_mask", "position_ids", "logits"


def unavailable_reason(providers: list[str]) -> str | None:
    """None when the first (preferred) provider is in this onnxruntime build, else what to install."""
    present = ort.get_available_providers()
    if providers[0] in present:
        return None
    return (f"{providers[0]} is not in this onnxruntime build (it has {', '.join(present)}); "
            "install onnxruntime-gpu in place of onnxruntime for the CUDA/TensorRT providers")


def _numpy_type(onnx_type: str, where: str) -> type:
    if onnx_type not in _NUMPY_TYPES:
        raise PackageError(f"{where} has element type {onnx_type}, which this runtime does not feed")
    return _NUMPY_TYPES[onnx_type]


class OrtSession:
    """A stateless component session: casts inputs to the model's types and returns numpy outputs."""

    def __init__(self, session: Any, component: str, device_id: int = 0) -> None:
        self.session = session
        self.component = component
        self.device_id = device_id
        self.input_types = {i.name: _numpy_type(i.type, f"{component} input {i.name}") for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run on named inputs (numpy, or device arrays with __cuda_array_interface__); return numpy outputs."""
        missing = set(self.input_types) - set(inputs)
        if missing:
            raise ValueError(f"{self.component} needs inputs {sorted(missing)}; got {sorted(inputs)}")
        if not any(hasattr(value, "__cuda_array_interface__") for value in inputs.values()):
            feed = {name: np.ascontiguousarray(inputs[name], dtype=dtype) for name, dtype in self.input_types.items()}
            return dict(zip(self.output_names, self.session.run(self.output_names, feed), strict=True))
        binding = self.session.io_binding()
        for name, dtype in self.input_types.items():
            interface = getattr(inputs[name], "__cuda_array_interface__", None)
            if interface is None:
                binding.bind_cpu_input(name, np.ascontiguousarray(inputs[name], dtype=dtype))
                continue
            if np.dtype(interface["typestr"]) != dtype:
                raise PackageError(f"{self.component} input {name} is {np.dtype(dtype)} but the device array is "
                                   f"{np.dtype(interface['typestr'])}; patchify with that dtype")
            binding.bind_input(name, "cuda", self.device_id, dtype, list(interface["shape"]), interface["data"][0])
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: value.numpy() for name, value in zip(self.output_names, binding.get_outputs(), strict=True)}


class OrtDecoderSession:
    """The decoder with its KV cache as ORT values (see the module docstring for what is copied)."""

    def __init__(self, session: Any, embed: OrtSession, spec: DecoderSpec, device: str) -> None:
        self._session = session
        self._embed = embed
        self._spec = spec
        self._device = device
        inputs = {i.name: i for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        layers = range(spec.num_layers)
        self._past_names = [t % i for i in layers for t in (spec.past_key, spec.past_value)]
        self._present_names = [t % i for i in layers for t in (spec.present_key, spec.present_value)]
        # GroupQueryAttention decoders derive positions from the mask; torch-exported ones take them.
        self._has_positions = _POSITIONS in inputs
        self._shared = spec.kv_cache == "shared"
        want_in = [_EMBEDS, _MASK, *self._past_names] + ([_POSITIONS] if not self._shared else [])
        want_out = [_LOGITS, *self._present_names]
        missing = [n for n in want_in if n not in inputs] + [n for n in want_out if n not in outputs]
        if missing:
            raise PackageError(f"decoder.onnx lacks {missing} that the manifest's decoder spec names "
                               f"(it has inputs {sorted(inputs)}, outputs {outputs}); re-export the package")
        self._embeds_type = _numpy_type(inputs[_EMBEDS].type, "decoder inputs_embeds")
        self._kv_type = _numpy_type(inputs[self._past_names[0]].type, "decoder past key")
        self._embed_input = next(iter(embed.input_types))
        self._embed_output = embed.output_names[0]
        self._past: list[Any] = []
        self._seq_len = 0
        self.reset()

    @property
    def seq_len(self) -> int:
        """Tokens currently held in the KV cache."""
        return self._seq_len

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the package allows."""
        return self._spec.max_seq_len

    def reset(self) -> None:
        """Empty the cache (a shared buffer is kept: positions past seq_len are never read)."""
        if self._shared:
            if not self._past:
                shape = (1, self._spec.num_kv_heads, self._spec.max_seq_len, self._spec.head_dim)
                self._past = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype=self._kv_type), self._device, 0)
                              for _ in self._past_names]
        else:
            empty = np.zeros((1, self._spec.num_kv_heads, 0, self._spec.head_dim), dtype=self._kv_type)
            self._past = [ort.OrtValue.ortvalue_from_numpy(empty, self._device, 0)] * len(self._past_names)
        self._seq_len = 0

    def fork(self) -> OrtDecoderSession:
        """A session starting from this cache: in-place buffers are copied, read-only past values shared."""
        other = object.__new__(OrtDecoderSession)
        other.__dict__.update(self.__dict__)
        other._past = ([self._copy_prefix(value, 1, self._spec.max_seq_len) for value in self._past]
                       if self._shared else list(self._past))
        return other

    def _copy_prefix(self, value: Any, batch: int, length: int) -> Any:
        """A new in-place buffer of `batch` rows x `length` positions holding this cache's positions in each row.

        Only the held positions are written: np.zeros memory is mapped by the OS as it is first
        touched, so a fork of a short prefix does not make a whole max_seq_len buffer resident.
        """
        held = self._seq_len
        buffer = np.zeros((batch, self._spec.num_kv_heads, length, self._spec.head_dim), dtype=self._kv_type)
        buffer[:, :, :held] = value.numpy()[:, :, :held]
        return ort.OrtValue.ortvalue_from_numpy(buffer, self._device, 0)

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append `inputs_embeds` (1, seq, hidden) to the cache; return the last position's logits (vocab,)."""
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1 or inputs_embeds.shape[2] != self._spec.hidden_size:
            raise ValueError(f"prefill needs inputs_embeds of shape (1, seq, {self._spec.hidden_size}), "
                             f"got {inputs_embeds.shape}")
        embeds = np.ascontiguousarray(inputs_embeds, dtype=self._embeds_type)
        return self._step(ort.OrtValue.ortvalue_from_numpy(embeds, self._device, 0), embeds.shape[1])

    def decode(self, token_id: int) -> np.ndarray:
        """Embed `token_id` (on the device), append it to the cache and return the next logits (vocab,)."""
        return self._step(self._embed_tokens(np.array([[token_id]], dtype=np.int64)), 1)

    def continuation_logits(self, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each continuation, the logits after each of its tokens, the continuations advancing together.

        One decoder call per token position, each row one continuation, from a copy of this cache (which
        is left unchanged). Rows go longest first and a row leaves the batch once its continuation is
        done: the running rows are always the first ones of the batch's cache, and none is padded.
        """
        check_continuations(self, continuations)
        if not continuations:
            return []
        order = sorted(range(len(continuations)), key=lambda index: -len(continuations[index]))
        rows = [list(continuations[index]) for index in order]
        past = self._batched_past(len(rows), len(rows[0]))
        logits: list[list[np.ndarray]] = [[] for _ in rows]
        for step in range(len(rows[0])):
            running = sum(len(row) > step for row in rows)
            tokens = np.array([[row[step]] for row in rows[:running]], dtype=np.int64)
            step_logits, past = self._run(self._embed_tokens(tokens), past, self._seq_len + step, 1)
            for row in range(running):
                logits[row].append(step_logits[row, -1])
        result: list[np.ndarray] = [np.empty(0)] * len(rows)
        for row, index in enumerate(order):
            result[index] = np.stack(logits[row])
        return result

    def _batched_past(self, batch: int, steps: int) -> list[Any]:
        """This cache for `batch` rows: the past repeated, or in-place buffers with room for `steps` more."""
        if not self._shared:
            return [ort.OrtValue.ortvalue_from_numpy(np.repeat(value.numpy(), batch, axis=0), self._device, 0)
                    for value in self._past]
        return [self._copy_prefix(value, batch, self._seq_len + steps) for value in self._past]

    def _embed_tokens(self, token_ids: np.ndarray) -> Any:
        """The embeddings of `token_ids` (batch, seq), left on the decoder's device."""
        binding = self._embed.session.io_binding()
        binding.bind_cpu_input(self._embed_input, token_ids)
        binding.bind_output(self._embed_output, self._device)
        self._embed.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def _step(self, embeds: Any, seq: int) -> np.ndarray:
        total = self._seq_len + seq
        if total > self._spec.max_seq_len:
            raise ValueError(f"sequence of {total} tokens exceeds the package's max_seq_len "
                             f"{self._spec.max_seq_len}")
        logits, self._past = self._run(embeds, self._past, self._seq_len, seq)
        self._seq_len = total
        return logits[0, -1]

    def _run(self, embeds: Any, past: list[Any], past_len: int, seq: int) -> tuple[np.ndarray, list[Any]]:
        """One decoder call: `seq` new positions per row after `past_len` cached ones (rows: embeds' batch).

        Returns the logits (batch, positions, vocab) and the cache to continue from: the presents, or for
        in-place buffers the same buffers, GroupQueryAttention having written the new positions into them.
        """
        batch, total = embeds.shape()[0], past_len + seq
        binding = self._session.io_binding()
        binding.bind_ortvalue_input(_EMBEDS, embeds)
        binding.bind_cpu_input(_MASK, np.ones((batch, total), dtype=np.int64))
        if self._has_positions:
            binding.bind_cpu_input(_POSITIONS, np.tile(np.arange(past_len, total, dtype=np.int64), (batch, 1)))
        for name, value in zip(self._past_names, past, strict=True):
            self._bind_rows(binding, name, value, batch, output=False)
        binding.bind_output(_LOGITS, "cpu")
        for name, value in zip(self._present_names, past, strict=True):
            if self._shared:  # the same buffer: GroupQueryAttention writes the new positions in place
                self._bind_rows(binding, name, value, batch, output=True)
            else:
                binding.bind_output(name, self._device)
        binding.synchronize_inputs()
        self._session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        outputs = binding.get_outputs()
        logits = outputs[0].numpy()
        presents = past if self._shared else [outputs[i] for i in range(1, len(outputs))]
        return logits.reshape(batch, -1, logits.shape[-1]), presents

    def _bind_rows(self, binding: Any, name: str, value: Any, rows: int, *, output: bool) -> None:
        """Bind `value`, or only its first `rows` rows (a contiguous prefix: rows are the outer axis)."""
        if value.shape()[0] == rows:
            (binding.bind_ortvalue_output if output else binding.bind_ortvalue_input)(name, value)
            return
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self._device, 0, self._kv_type, [rows, *value.shape()[1:]], value.data_ptr())


def _session_options(threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads is not None:
        if threads < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    # Components run one after another, so inter-op parallelism only adds idle threads.
    options.inter_op_num_threads = 1
    return options


def _create(path: Path, component: str, providers: list[str], threads: int | None,
            spec: ComponentSpec | None = None) -> Any:
    """A session for one component; with `spec`, from its copy whose prepacked weights are mapped (CPU only)."""
    options = _session_options(threads)
    copy = prepacked.mapped_copy(ort, path, spec, component, lambda: _session_options(threads)) if spec else None
    if copy is not None:
        path = copy
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised when saved
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # ORT raises its own untyped errors (Fail, InvalidGraph, ...)
        raise PackageError(f"ONNX Runtime cannot load {component} ({path.name}): {exc}") from exc


def _check_io(session: Any, manifest: Manifest, component: str) -> None:
    spec = manifest.components[component]
    declared = {t.name for t in spec.inputs}
    actual = {i.name for i in session.get_inputs()}
    if declared != actual:
        raise PackageError(f"{spec.file} inputs {sorted(actual)} differ from the manifest's {sorted(declared)}; "
                           "re-export the package")


def open_package(package_dir: Path, manifest: Manifest, *, threads: int | None, providers: list[str],
                 prepacked_min_bytes: int = prepacked.MIN_BYTES) -> PackageSessions:
    """Create the four sessions of a package (once; they are reused for every image and token).

    On the CPU provider, components of at least `prepacked_min_bytes` load from a cached copy whose
    prepacked weights are memory-mapped (`fundusrt.runtime.backends.prepacked`).
    """
    raw = {}
    for component, spec in manifest.components.items():
        mapped = (providers == ["CPUExecutionProvider"]
                  and prepacked.component_bytes(package_dir, spec) >= prepacked_min_bytes)
        raw[component] = _create(package_dir / spec.file, component, with_trt_profiles(providers, manifest, component),
                                 threads, spec if mapped else None)
        _check_io(raw[component], manifest, component)
    device = _DEVICE_FOR_PROVIDER.get(raw["decoder"].get_providers()[0], "cpu")
    embed = OrtSession(raw["embed"], "embed")
    vision = OrtSession(raw["vision"], "vision")
    sessions = PackageSessions(
        vision=vision,
        connector=OrtSession(raw["connector"], "connector"),
        embed=embed,
        decoder=OrtDecoderSession(raw["decoder"], embed, manifest.decoder, device),
        backend="",
        details={"providers": raw["decoder"].get_providers(), "device": device, "threads": threads},
    )
    if device == "cuda":
        sessions.patchify = _gpu_patchify(next(iter(vision.input_types.values())))
    return sessions


def _gpu_patchify(dtype: type) -> Any:
    """Patching by fundusrt's CUDA kernels on device 0 (ORT's), synchronised before ORT's stream reads it."""
    from fundusrt._deps import MissingDependencyError
    from fundusrt.kernels.cuda.build import KernelBuildError
    from fundusrt.kernels.cuda_patchify import CudaError, default_patchifier

    try:
        patchifier = default_patchifier(0)
    except (CudaError, KernelBuildError, MissingDependencyError) as exc:
        raise BackendError(f"the CUDA patching kernels cannot load, so the ONNX Runtime CUDA backend cannot take "
                           f"images: {exc}") from exc

    def patchify(image: np.ndarray, tiling: Any) -> Any:
        # stream None: the call waits for its kernels, since ORT reads the tiles on a stream of its own.
        return patchifier.patchify(image, tiling, dtype=dtype)

    return patchify

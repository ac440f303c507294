"""TensorRT backend: engines built by `fundusrt build-engines`, run through tensorrt + cuda-python.

Everything stays in device memory on one CUDA stream: inputs are copied up once (or not at all:
a `CudaPatches` from the CUDA patching kernel is bound by its device pointer), the decoder's KV
cache lives in two device buffers per tensor that swap roles every step (the exported decoder
concatenates past and new keys, so past is read from one buffer while present is written to the
other), attention mask and positions are slices of constant device arrays, and in `decode` the
embed engine writes the token's embedding straight into the decoder's input buffer. Only the
logits come back to the host. The image is patchified on the GPU (the CUDA patching kernels, on the
backend's stream) and its tiles are bound to the vision engine by device pointer.

A decoder and its forks share one family of device state: engines, execution contexts, staging
buffers, a pool of KV cache slots and the CUDA graph cache. A fork takes a free slot from the pool (a
dropped fork's slot goes back to it), so `ask_many` reuses the same few slots question after question.
With `cuda_graph=True` each decode step is captured once per (slot, cache length, buffer parity), the
key that fixes every device address the step touches, and replayed by whichever session of the family
reaches that key again: later questions of a study, and every study with the same prompt lengths
(fixed questions, same tile count: a screening device).

The CUDA context is made current on every call, on the calling thread (`base.bind_context`): the node
opens the package on its main thread and runs studies on a worker thread.

Engines are tied to the TensorRT version and GPU that built them: `trt_engines` checks the manifest's
record before TensorRT is asked to load them; `trt_graphs` holds the device-free slot and graph
bookkeeping. Importing this module needs neither tensorrt nor cuda-python.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt._deps import MissingDependencyError, require
from fundusrt.manifest import DecoderSpec, Manifest, PackageError
from fundusrt.runtime.backends.base import (
    BackendError,
    PackageSessions,
    Patchify,
    bind_context,
    continuation_logits_by_forks,
)
from fundusrt.runtime.backends.trt_engines import (
    ENGINE_COMPONENTS,
    compatibility_problem,
    current_target,
    engine_record,
    rebuild_command,
    verify_engines,
)
from fundusrt.runtime.backends.trt_graphs import GraphCache, KvSlots

_EMBEDS, _MASK, _POSITIONS, _LOGITS = "inputs_embeds", "attention_mask", "position_ids", "logits"
_MAX_GRAPHS = 256


def unavailable_reason(**_: Any) -> str | None:
    """None when tensorrt, cuda-python and a CUDA device are present, else what is missing."""
    for module in ("tensorrt", "cuda.bindings.driver"):
        try:
            require(module, "the TensorRT backend")
        except MissingDependencyError as exc:
            return str(exc)
    try:
        current_target()
    except Exception as exc:  # no driver or no device: cuda-python raises its own loader errors
        return f"no usable CUDA device for TensorRT ({exc})"
    return None


# -- CUDA -------------------------------------------------------------------------------------------


class _Device:
    """A CUDA context, one stream and the few driver calls the backend makes."""

    def __init__(self, device: int = 0) -> None:
        from fundusrt.kernels.cuda_patchify import check_cuda

        self.drv = require("cuda.bindings.driver", "the TensorRT backend")
        self.check = check_cuda
        self.ordinal = device
        check_cuda(self.drv.cuInit(0), "cuInit")
        self.ctx = check_cuda(self.drv.cuDevicePrimaryCtxRetain(check_cuda(self.drv.cuDeviceGet(device), "cuDeviceGet")),
                              "cuDevicePrimaryCtxRetain")
        self.activate()
        self.stream = check_cuda(self.drv.cuStreamCreate(0), "cuStreamCreate")
        self.handle = int(self.stream)

    def activate(self) -> None:
        """Make the context current on the calling thread (see the module docstring)."""
        self.check(self.drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        ptr = self.check(self.drv.cuMemAlloc(max(int(nbytes), 1)), f"cuMemAlloc({nbytes})")
        return int(ptr)

    def free(self, ptr: int) -> None:
        # finalizers run on whichever thread drops the last reference
        self.activate()
        self.check(self.drv.cuMemFree(ptr), "cuMemFree")

    def upload(self, ptr: int, array: np.ndarray) -> None:
        self.check(self.drv.cuMemcpyHtoDAsync(ptr, array.ctypes.data, array.nbytes, self.stream), "cuMemcpyHtoDAsync")

    def download(self, array: np.ndarray, ptr: int) -> None:
        self.check(self.drv.cuMemcpyDtoHAsync(array.ctypes.data, ptr, array.nbytes, self.stream), "cuMemcpyDtoHAsync")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.check(self.drv.cuMemcpyDtoDAsync(dst, src, nbytes, self.stream), "cuMemcpyDtoDAsync")

    def sync(self) -> None:
        self.check(self.drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")

    def destroy_graph(self, graph_exec: Any) -> None:
        self.activate()
        self.check(self.drv.cuGraphExecDestroy(graph_exec), "cuGraphExecDestroy")


class _Buffers:
    """Device buffers by name, grown on demand and freed with their owner."""

    def __init__(self, device: _Device) -> None:
        self.device = device
        self.ptrs: dict[str, tuple[int, int]] = {}
        weakref.finalize(self, _free_all, device, self.ptrs)

    def get(self, name: str, nbytes: int) -> int:
        ptr, capacity = self.ptrs.get(name, (0, -1))
        if capacity < nbytes:
            if ptr:
                self.device.free(ptr)
            ptr = self.device.alloc(nbytes)
            self.ptrs[name] = (ptr, nbytes)
        return ptr


def _free_all(device: _Device, ptrs: dict[str, tuple[int, int]]) -> None:
    for ptr, _ in ptrs.values():
        device.free(ptr)


def _set_shape(context: Any, name: str, shape: tuple[int, ...], component: str) -> None:
    if not context.set_input_shape(name, shape):
        raise ValueError(f"{component} input {name} shape {shape} is outside the engine's optimisation profile; "
                         "rebuild the engines for larger inputs")


def _set_address(context: Any, name: str, ptr: int, component: str) -> None:
    if not context.set_tensor_address(name, ptr):
        raise RuntimeError(f"TensorRT refused the device address of {component} tensor {name}")


def _execute(context: Any, device: _Device, component: str) -> None:
    if not context.execute_async_v3(device.handle):
        raise RuntimeError(f"TensorRT failed to run {component} (see its log above)")


class TrtSession:
    """A stateless engine (vision, connector, embed); inputs may be numpy or CUDA Array Interface objects."""

    def __init__(self, engine: Any, device: _Device, component: str) -> None:
        trt = require("tensorrt", "the TensorRT backend")
        self.engine, self.device, self.component = engine, device, component
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BackendError(f"TensorRT could not create an execution context for {component} (out of GPU memory?)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self.buffers = _Buffers(device)

    def bind_inputs(self, inputs: dict[str, Any]) -> None:
        """Set shapes and addresses of every input (uploading numpy arrays)."""
        missing = set(self.inputs) - set(inputs)
        if missing:
            raise ValueError(f"{self.component} needs inputs {sorted(missing)}; got {sorted(inputs)}")
        for name in self.inputs:
            value = inputs[name]
            interface = getattr(value, "__cuda_array_interface__", None)
            if interface is not None:  # zero-copy: a device array, e.g. CudaPatches from the patching kernel
                if np.dtype(interface["typestr"]) != self.dtypes[name]:
                    raise ValueError(f"{self.component} input {name} is {self.dtypes[name]} in the engine but the "
                                     f"device array is {np.dtype(interface['typestr'])}; patchify with that dtype")
                if interface.get("stream") and interface["stream"] != self.device.handle:
                    # produced on another stream: wait for it (on ours, stream order already does)
                    self.device.check(self.device.drv.cuStreamSynchronize(interface["stream"]), "producer stream")
                shape, ptr = tuple(interface["shape"]), int(interface["data"][0])
            else:
                array = np.ascontiguousarray(value, dtype=self.dtypes[name])
                shape, ptr = array.shape, self.buffers.get(name, array.nbytes)
                self.device.upload(ptr, array)
            _set_shape(self.context, name, shape, self.component)
            _set_address(self.context, name, ptr, self.component)
        unresolved = self.context.infer_shapes()
        if unresolved:
            raise ValueError(f"{self.component}: TensorRT cannot infer the shapes of {unresolved} from the inputs")

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run on named inputs; return every output as numpy."""
        self.bind_inputs(inputs)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise RuntimeError(f"{self.component} output {name} has unresolved shape {shape}")
            results[name] = np.empty(shape, dtype=self.dtypes[name])
            _set_address(self.context, name, self.buffers.get(name, results[name].nbytes), self.component)
        _execute(self.context, self.device, self.component)
        for name, array in results.items():
            self.device.download(array, self.buffers.ptrs[name][0])
        self.device.sync()
        return results


class _DecoderFamily:
    """What a decoder shares with its forks: contexts per phase, staging buffers, KV slots and graphs."""

    def __init__(self, engine: Any, embed: TrtSession, spec: DecoderSpec, device: _Device, profiles: dict[str, int],
                 cuda_graph: bool) -> None:
        trt = require("tensorrt", "the TensorRT backend")
        self.spec, self.device, self.embed, self.use_graphs = spec, device, embed, cuda_graph
        if engine.num_optimization_profiles != len(profiles) or set(profiles) != {"prefill", "decode"}:
            raise PackageError(f"the decoder engine has {engine.num_optimization_profiles} optimisation profiles and "
                               f"the manifest names {sorted(profiles)}; expected prefill and decode: rebuild the engines")
        self.contexts = {}
        for phase in ("prefill", "decode"):
            context = engine.create_execution_context()
            if context is None or not context.set_optimization_profile_async(profiles[phase], device.handle):
                raise BackendError(f"TensorRT could not select the decoder's {phase} profile ({profiles[phase]})")
            self.contexts[phase] = context
        layers = range(spec.num_layers)
        self.past_names = [t % i for i in layers for t in (spec.past_key, spec.past_value)]
        self.present_names = [t % i for i in layers for t in (spec.present_key, spec.present_value)]
        self.kv_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self.past_names[0])))
        self.embeds_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(_EMBEDS)))
        self.logits = np.empty(spec.vocab_size, dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(_LOGITS))))
        self.shared = _Buffers(device)
        max_seq = spec.max_seq_len
        self.shared.get("embeds", max_seq * spec.hidden_size * self.embeds_dtype.itemsize)
        self.shared.get("logits", self.logits.nbytes)
        self.shared.get("token", 8)
        device.upload(self.shared.get("mask", max_seq * 8), np.ones(max_seq, dtype=np.int64))
        device.upload(self.shared.get("positions", max_seq * 8), np.arange(max_seq, dtype=np.int64))
        self.slots: KvSlots[_Buffers] = KvSlots(self._new_slot)
        self.graphs = GraphCache(_MAX_GRAPHS, device.destroy_graph)
        weakref.finalize(self, self.graphs.clear)
        device.sync()

    def kv_bytes(self, seq: int) -> int:
        return self.spec.num_kv_heads * seq * self.spec.head_dim * self.kv_dtype.itemsize

    def _new_slot(self) -> _Buffers:
        kv = _Buffers(self.device)
        for name in self.past_names:
            kv.get(f"{name}/0", self.kv_bytes(self.spec.max_seq_len))
            kv.get(f"{name}/1", self.kv_bytes(self.spec.max_seq_len))
        return kv

    def ptr(self, name: str) -> int:
        return self.shared.ptrs[name][0]


class TrtDecoderSession:
    """The decoder with its KV cache in one slot of its family (see the module docstring)."""

    def __init__(self, family: _DecoderFamily) -> None:
        self._family, self._slot = family, family.slots.lease(self)
        self._seq_len, self._parity = 0, 0

    @property
    def seq_len(self) -> int:
        """Tokens currently held in the KV cache."""
        return self._seq_len

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the package allows."""
        return self._family.spec.max_seq_len

    def reset(self) -> None:
        """Empty the cache (the buffers stay allocated)."""
        self._seq_len, self._parity = 0, 0

    def fork(self) -> TrtDecoderSession:
        """A session with its own copy of the current cache, in a free slot of the family."""
        family = self._family
        other = TrtDecoderSession(family)
        other._seq_len, other._parity = self._seq_len, self._parity
        source, target = family.slots.buffers(self._slot), family.slots.buffers(other._slot)
        for name in family.past_names:
            key = f"{name}/{self._parity}"
            family.device.copy(target.ptrs[key][0], source.ptrs[key][0], family.kv_bytes(self._seq_len))
        family.device.sync()
        return other

    def continuation_logits(self, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """For each continuation, the logits after each of its tokens: a fork per continuation, one after another.

        The engines' optimisation profiles are batch 1, so the rows cannot share a call here; the forks
        reuse one KV slot of the family, and with `cuda_graph=True` their decode steps replay graphs.
        """
        return continuation_logits_by_forks(self, continuations)

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append `inputs_embeds` (1, seq, hidden) to the cache; return the last position's logits (vocab,)."""
        family = self._family
        hidden = family.spec.hidden_size
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1 or inputs_embeds.shape[2] != hidden:
            raise ValueError(f"prefill needs inputs_embeds of shape (1, seq, {hidden}), got {inputs_embeds.shape}")
        self._check_room(inputs_embeds.shape[1])
        family.device.upload(family.ptr("embeds"), np.ascontiguousarray(inputs_embeds, dtype=family.embeds_dtype))
        return self._step("prefill", inputs_embeds.shape[1])

    def decode(self, token_id: int) -> np.ndarray:
        """Embed `token_id` on the device into the decoder's input buffer, step, and return the next logits."""
        self._check_room(1)
        family = self._family
        embed = family.embed
        family.device.upload(family.ptr("token"), np.array([[token_id]], dtype=np.int64))
        _set_shape(embed.context, embed.inputs[0], (1, 1), "embed")
        _set_address(embed.context, embed.inputs[0], family.ptr("token"), "embed")
        _set_address(embed.context, embed.outputs[0], family.ptr("embeds"), "embed")
        _execute(embed.context, family.device, "the embed engine")
        return self._step("decode", 1)

    def _check_room(self, seq: int) -> None:
        if self._seq_len + seq > self.max_seq_len:
            raise ValueError(f"sequence of {self._seq_len + seq} tokens exceeds the package's max_seq_len "
                             f"{self.max_seq_len}")

    def _bind(self, context: Any, seq: int) -> None:
        family, spec = self._family, self._family.spec
        past, total = self._seq_len, self._seq_len + seq
        kv = family.slots.buffers(self._slot)
        _set_shape(context, _EMBEDS, (1, seq, spec.hidden_size), "decoder")
        _set_shape(context, _MASK, (1, total), "decoder")
        _set_shape(context, _POSITIONS, (1, seq), "decoder")
        _set_address(context, _EMBEDS, family.ptr("embeds"), "decoder")
        _set_address(context, _MASK, family.ptr("mask"), "decoder")
        _set_address(context, _POSITIONS, family.ptr("positions") + 8 * past, "decoder")
        _set_address(context, _LOGITS, family.ptr("logits"), "decoder")
        for past_name, present_name in zip(family.past_names, family.present_names, strict=True):
            _set_shape(context, past_name, (1, spec.num_kv_heads, past, spec.head_dim), "decoder")
            _set_address(context, past_name, kv.ptrs[f"{past_name}/{self._parity}"][0], "decoder")
            _set_address(context, present_name, kv.ptrs[f"{past_name}/{1 - self._parity}"][0], "decoder")

    def _step(self, phase: str, seq: int) -> np.ndarray:
        family, device = self._family, self._family.device
        context = family.contexts[phase]
        graphed = phase == "decode" and family.use_graphs
        key = (self._slot, self._seq_len, self._parity)
        graph = family.graphs.get(key) if graphed else None
        if graph is not None:
            device.check(device.drv.cuGraphLaunch(graph, device.stream), "cuGraphLaunch")
        else:
            self._bind(context, seq)
            # TensorRT applies shape changes on the first enqueue, so a graph is captured after one plain run.
            _execute(context, device, f"the decoder ({phase})")
            if graphed:
                family.graphs.put(key, self._capture(context))
        device.download(family.logits, family.ptr("logits"))
        device.sync()
        self._seq_len += seq
        self._parity = 1 - self._parity
        return family.logits.astype(np.float32)

    def _capture(self, context: Any) -> Any:
        device = self._family.device
        drv, check = device.drv, device.check
        check(drv.cuStreamBeginCapture(device.stream, drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
              "cuStreamBeginCapture")
        ran = context.execute_async_v3(device.handle)
        graph = check(drv.cuStreamEndCapture(device.stream), "cuStreamEndCapture")  # always end the capture
        try:
            if not ran:
                raise RuntimeError("TensorRT failed to enqueue the decoder while a CUDA graph was being captured")
            return check(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        finally:
            check(drv.cuGraphDestroy(graph), "cuGraphDestroy")


def _load_engine(runtime: Any, path: Path, component: str, package_dir: Path, precision: str) -> Any:
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise PackageError(f"TensorRT could not load the {component} engine {path.name}; rebuild the engines with "
                           f"`{rebuild_command(package_dir, precision)}`")
    return engine


def _gpu_patchify(device: _Device, dtype: np.dtype) -> Patchify:
    """Patching on the GPU, on the backend's stream, tiles left in device memory for the vision engine."""
    from fundusrt.kernels.cuda.build import KernelBuildError
    from fundusrt.kernels.cuda_patchify import CudaError, default_patchifier

    try:
        patchifier = default_patchifier(device.ordinal)
    except (CudaError, KernelBuildError, MissingDependencyError) as exc:
        raise BackendError(f"the CUDA patching kernels cannot load, so the TensorRT backend cannot take images: {exc}") from exc

    def patchify(image: np.ndarray, tiling: Any) -> Any:
        return patchifier.patchify(image, tiling, dtype=dtype, stream=device.handle)

    return patchify


def open_package(package_dir: Path, manifest: Manifest, *, threads: int | None = None, cuda_graph: bool = False,
                 device: int = 0) -> PackageSessions:
    """Check and load the package's engines and create the four sessions (`threads` does not apply)."""
    trt = require("tensorrt", "the TensorRT backend")
    record = engine_record(manifest, package_dir)
    problem = compatibility_problem(record, current_target(device), package_dir)
    if problem:
        raise BackendError(problem)
    verify_engines(record, package_dir)
    cuda = _Device(device)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    precision = record.get("precision", "fp16")
    engines = {c: _load_engine(runtime, package_dir / record["engines"][c]["file"], c, package_dir, precision)
               for c in ENGINE_COMPONENTS}
    profiles = {p["name"]: i for i, p in enumerate(record["engines"]["decoder"]["profiles"])}
    embed = TrtSession(engines["embed"], cuda, "embed")
    vision = TrtSession(engines["vision"], cuda, "vision")
    family = _DecoderFamily(engines["decoder"], embed, manifest.decoder, cuda, profiles, cuda_graph)
    sessions = PackageSessions(
        vision=vision,
        connector=TrtSession(engines["connector"], cuda, "connector"),
        embed=embed,
        decoder=TrtDecoderSession(family),
        backend="",
        details={"tensorrt_version": trt.__version__, "precision": precision, "cuda_graph": cuda_graph,
                 "gpu": record.get("gpu_name")},
        patchify=_gpu_patchify(cuda, vision.dtypes[vision.inputs[0]]),
    )
    return bind_context(sessions, cuda)

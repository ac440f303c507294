"""TensorRT backend: engines built by `fundusrt build-engines`, run through tensorrt + cuda-python.

Everything stays in device memory on one CUDA stream: inputs are copied up once (or not at all:
a `CudaPatches` from the CUDA patching kernel is bound by its device pointer), the decoder's KV
cache lives in two device buffers per tensor that swap roles every step (the exported decoder
concatenates past and new keys, so past is read from one buffer while present is written to the
other), attention mask and positions are slices of constant device arrays, and in `decode` the
embed engine writes the token's embedding straight into the decoder's input buffer. Only the
logits come back to the host. With `cuda_graph=True` each decode step is captured once per
(cache length, buffer parity) and replayed, which pays off when the same prompt lengths recur
(fixed questions, same tile count: every study of a screening device).

Engines are tied to the TensorRT version and GPU that built them; the manifest records both, and
a mismatch is reported with the command that rebuilds them before TensorRT is asked to load them.
Importing this module needs neither tensorrt nor cuda-python (tests check the metadata logic).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt._deps import available, require
from fundusrt.manifest import DecoderSpec, Manifest, PackageError, sha256_file
from fundusrt.runtime.backends.base import BackendError, PackageSessions

TRT_KEY = "tensorrt"
_ENGINE_COMPONENTS = ("vision", "connector", "embed", "decoder")
_EMBEDS, _MASK, _POSITIONS, _LOGITS = "inputs_embeds", "attention_mask", "position_ids", "logits"
_MAX_GRAPHS = 256


@dataclass(frozen=True)
class EngineTarget:
    """What a serialized engine is bound to."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (compute capability {self.compute_capability})"


def rebuild_command(package_dir: Path | str, precision: str) -> str:
    """The command that rebuilds a package's engines for this machine."""
    return f"fundusrt build-engines {package_dir} --{precision}"


def engine_record(manifest: Manifest, package_dir: Path | str) -> dict[str, Any]:
    """The manifest's TensorRT record, or PackageError saying how to build engines."""
    record = manifest.extra.get(TRT_KEY)
    if not isinstance(record, dict) or "engines" not in record:
        raise PackageError(f"package {package_dir} has no TensorRT engines; build them on this device with "
                           f"`{rebuild_command(package_dir, 'fp16')}` (or --int8 for a calibrated INT8 package)")
    missing = [c for c in _ENGINE_COMPONENTS if c not in record["engines"]]
    if missing:
        raise PackageError(f"package {package_dir} has no engines for {missing}; rebuild with "
                           f"`{rebuild_command(package_dir, record.get('precision', 'fp16'))}`")
    return record


def compatibility_problem(record: dict[str, Any], current: EngineTarget, package_dir: Path | str) -> str | None:
    """Why engines recorded in `record` cannot run on `current`, with the rebuild command; None when they can.

    TensorRT engines are specific to the exact TensorRT version and to the GPU model they were
    built on (kernels are chosen by timing on that GPU), so both must match.
    """
    built = EngineTarget(str(record.get("tensorrt_version")), str(record.get("gpu_name")),
                         str(record.get("compute_capability")))
    differences = []
    if built.tensorrt_version != current.tensorrt_version:
        differences.append(f"TensorRT {built.tensorrt_version} != {current.tensorrt_version}")
    if built.compute_capability != current.compute_capability:
        differences.append(f"compute capability {built.compute_capability} != {current.compute_capability}")
    if built.gpu_name != current.gpu_name:
        differences.append(f"GPU {built.gpu_name!r} != {current.gpu_name!r}")
    if not differences:
        return None
    return (f"the TensorRT engines of {package_dir} were built with {built.describe()}, but this machine has "
            f"{current.describe()} ({'; '.join(differences)}). Engines do not carry over between TensorRT "
            f"versions or GPUs: rebuild them here with `{rebuild_command(package_dir, record.get('precision', 'fp16'))}`")


def verify_engines(record: dict[str, Any], package_dir: Path) -> None:
    """Check every engine file exists and matches its sha256; raise PackageError listing all problems."""
    problems = []
    for component, entry in record["engines"].items():
        path = package_dir / entry["file"]
        if not path.is_file():
            problems.append(f"{entry['file']} ({component}): missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{entry['file']} ({component}): sha256 does not match the manifest (changed or corrupt)")
    if problems:
        raise PackageError(f"TensorRT engines of {package_dir} failed their integrity check: " + "; ".join(problems)
                           + f". Rebuild them with `{rebuild_command(package_dir, record.get('precision', 'fp16'))}`")


def current_target(device: int = 0) -> EngineTarget:
    """The TensorRT version and GPU of this machine (needs tensorrt and cuda-python)."""
    trt = require("tensorrt", "TensorRT engines")
    drv = require("cuda.bindings.driver", "TensorRT engines")
    from fundusrt.kernels.cuda_patchify import check_cuda

    check_cuda(drv.cuInit(0), "cuInit")
    dev = check_cuda(drv.cuDeviceGet(device), f"cuDeviceGet({device})")
    name = check_cuda(drv.cuDeviceGetName(256, dev), "cuDeviceGetName")
    attr = drv.CUdevice_attribute
    major = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev), "cc major")
    minor = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev), "cc minor")
    return EngineTarget(trt.__version__, name.split(b"\0", 1)[0].decode(), f"{major}.{minor}")


def unavailable_reason(**_: Any) -> str | None:
    """None when tensorrt, cuda-python and a CUDA device are present, else what is missing."""
    for module in ("tensorrt", "cuda.bindings.driver"):
        if not available(module):
            return f"{module} is not installed; install it with: pip install 'fundusrt[trt]'"
    try:
        current_target()
    except Exception as exc:  # no driver or no device: cuda-python raises its own loader errors
        return f"no usable CUDA device for TensorRT ({exc})"
    return None


class _Device:
    """A CUDA context, one stream and the few driver calls the backend makes."""

    def __init__(self, device: int = 0) -> None:
        from fundusrt.kernels.cuda_patchify import check_cuda

        self.drv = require("cuda.bindings.driver", "the TensorRT backend")
        self.check = check_cuda
        check_cuda(self.drv.cuInit(0), "cuInit")
        self.ctx = check_cuda(self.drv.cuDevicePrimaryCtxRetain(check_cuda(self.drv.cuDeviceGet(device), "cuDeviceGet")),
                          "cuDevicePrimaryCtxRetain")
        check_cuda(self.drv.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")
        self.stream = check_cuda(self.drv.cuStreamCreate(0), "cuStreamCreate")
        self.handle = int(self.stream)

    def alloc(self, nbytes: int) -> int:
        ptr = self.check(self.drv.cuMemAlloc(max(int(nbytes), 1)), f"cuMemAlloc({nbytes})")
        return int(ptr)

    def free(self, ptr: int) -> None:
        self.drv.cuMemFree(ptr)

    def upload(self, ptr: int, array: np.ndarray) -> None:
        self.check(self.drv.cuMemcpyHtoDAsync(ptr, array.ctypes.data, array.nbytes, self.stream), "cuMemcpyHtoDAsync")

    def download(self, array: np.ndarray, ptr: int) -> None:
        self.check(self.drv.cuMemcpyDtoHAsync(array.ctypes.data, ptr, array.nbytes, self.stream), "cuMemcpyDtoHAsync")

    def copy(self, dst: int, src: int, nbytes: int) -> None:
        self.check(self.drv.cuMemcpyDtoDAsync(dst, src, nbytes, self.stream), "cuMemcpyDtoDAsync")

    def sync(self) -> None:
        self.check(self.drv.cuStreamSynchronize(self.stream), "cuStreamSynchronize")


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


class TrtSession:
    """A stateless engine (vision, connector, embed); inputs may be numpy or CUDA Array Interface objects."""

    def __init__(self, engine: Any, device: _Device, component: str) -> None:
        trt = require("tensorrt", "the TensorRT backend")
        self.engine, self.device, self.component = engine, device, component
        self.context = engine.create_execution_context()
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
                if interface.get("stream"):
                    self.device.check(self.device.drv.cuStreamSynchronize(interface["stream"]), "producer stream")
                shape, ptr = tuple(interface["shape"]), int(interface["data"][0])
            else:
                array = np.ascontiguousarray(value, dtype=self.dtypes[name])
                shape, ptr = array.shape, self.buffers.get(name, array.nbytes)
                self.device.upload(ptr, array)
            if not self.context.set_input_shape(name, shape):
                raise ValueError(f"{self.component} input {name} shape {shape} is outside the engine's profile; "
                                 "rebuild the engines for larger inputs")
            self.context.set_tensor_address(name, ptr)

    def run(self, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Run on named inputs; return every output as numpy."""
        self.bind_inputs(inputs)
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = np.empty(shape, dtype=self.dtypes[name])
            self.context.set_tensor_address(name, self.buffers.get(name, results[name].nbytes))
        if not self.context.execute_async_v3(self.device.handle):
            raise RuntimeError(f"TensorRT failed to run {self.component}")
        for name, array in results.items():
            self.device.download(array, self.buffers.ptrs[name][0])
        self.device.sync()
        return results


class TrtDecoderSession:
    """The decoder with its KV cache in device memory (see the module docstring)."""

    def __init__(self, engine: Any, embed: TrtSession, spec: DecoderSpec, device: _Device, profiles: dict[str, int],
                 cuda_graph: bool) -> None:
        trt = require("tensorrt", "the TensorRT backend")
        self._spec, self._device, self._embed, self._use_graphs = spec, device, embed, cuda_graph
        self._contexts = {}
        for phase in ("prefill", "decode"):
            context = engine.create_execution_context()
            context.set_optimization_profile_async(profiles[phase], device.handle)
            self._contexts[phase] = context
        layers = range(spec.num_layers)
        self._past_names = [t % i for i in layers for t in (spec.past_key, spec.past_value)]
        self._present_names = [t % i for i in layers for t in (spec.present_key, spec.present_value)]
        self._kv_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._past_names[0])))
        self._embeds_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(_EMBEDS)))
        self._logits = np.empty(spec.vocab_size, dtype=np.dtype(trt.nptype(engine.get_tensor_dtype(_LOGITS))))
        self._shared = _Buffers(device)
        max_seq = spec.max_seq_len
        self._shared.get("embeds", max_seq * spec.hidden_size * self._embeds_dtype.itemsize)
        self._shared.get("logits", self._logits.nbytes)
        self._shared.get("token", 8)
        device.upload(self._shared.get("mask", max_seq * 8), np.ones(max_seq, dtype=np.int64))
        device.upload(self._shared.get("positions", max_seq * 8), np.arange(max_seq, dtype=np.int64))
        self._graphs: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._kv = self._new_cache()
        self._parity = 0
        self._seq_len = 0
        device.sync()

    def _new_cache(self) -> _Buffers:
        kv = _Buffers(self._device)
        nbytes = self._spec.num_kv_heads * self._spec.max_seq_len * self._spec.head_dim * self._kv_dtype.itemsize
        for name in self._past_names:
            kv.get(f"{name}/0", nbytes)
            kv.get(f"{name}/1", nbytes)
        return kv

    @property
    def seq_len(self) -> int:
        """Tokens currently held in the KV cache."""
        return self._seq_len

    @property
    def max_seq_len(self) -> int:
        """The longest sequence the package allows."""
        return self._spec.max_seq_len

    def reset(self) -> None:
        """Empty the cache (the buffers stay allocated)."""
        self._seq_len, self._parity = 0, 0

    def fork(self) -> TrtDecoderSession:
        """A session with its own copy of the current cache (engines and contexts are shared)."""
        other = object.__new__(TrtDecoderSession)
        other.__dict__.update(self.__dict__)
        other._kv, other._graphs = self._new_cache(), OrderedDict()
        nbytes = self._spec.num_kv_heads * self._seq_len * self._spec.head_dim * self._kv_dtype.itemsize
        for name in self._past_names:
            self._device.copy(other._kv.ptrs[f"{name}/{self._parity}"][0],
                              self._kv.ptrs[f"{name}/{self._parity}"][0], nbytes)
        other._shared = self._shared  # constant arrays and staging buffers; steps never overlap
        self._device.sync()
        return other

    def prefill(self, inputs_embeds: np.ndarray) -> np.ndarray:
        """Append `inputs_embeds` (1, seq, hidden) to the cache; return the last position's logits (vocab,)."""
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[0] != 1 or inputs_embeds.shape[2] != self._spec.hidden_size:
            raise ValueError(f"prefill needs inputs_embeds of shape (1, seq, {self._spec.hidden_size}), "
                             f"got {inputs_embeds.shape}")
        self._check_room(inputs_embeds.shape[1])
        self._device.upload(self._shared.ptrs["embeds"][0], np.ascontiguousarray(inputs_embeds, dtype=self._embeds_dtype))
        return self._step("prefill", inputs_embeds.shape[1])

    def decode(self, token_id: int) -> np.ndarray:
        """Embed `token_id` on the device into the decoder's input buffer, step, and return the next logits."""
        self._check_room(1)
        token = np.array([[token_id]], dtype=np.int64)
        self._device.upload(self._shared.ptrs["token"][0], token)
        context = self._embed.context
        context.set_input_shape(self._embed.inputs[0], (1, 1))
        context.set_tensor_address(self._embed.inputs[0], self._shared.ptrs["token"][0])
        context.set_tensor_address(self._embed.outputs[0], self._shared.ptrs["embeds"][0])
        if not context.execute_async_v3(self._device.handle):
            raise RuntimeError("TensorRT failed to run the embed engine")
        return self._step("decode", 1)

    def _check_room(self, seq: int) -> None:
        if self._seq_len + seq > self._spec.max_seq_len:
            raise ValueError(f"sequence of {self._seq_len + seq} tokens exceeds the package's max_seq_len "
                             f"{self._spec.max_seq_len}")

    def _bind(self, context: Any, seq: int) -> None:
        past, total = self._seq_len, self._seq_len + seq
        kv_shape = (1, self._spec.num_kv_heads, past, self._spec.head_dim)
        context.set_input_shape(_EMBEDS, (1, seq, self._spec.hidden_size))
        context.set_input_shape(_MASK, (1, total))
        context.set_input_shape(_POSITIONS, (1, seq))
        context.set_tensor_address(_EMBEDS, self._shared.ptrs["embeds"][0])
        context.set_tensor_address(_MASK, self._shared.ptrs["mask"][0])
        context.set_tensor_address(_POSITIONS, self._shared.ptrs["positions"][0] + 8 * past)
        context.set_tensor_address(_LOGITS, self._shared.ptrs["logits"][0])
        for past_name, present_name in zip(self._past_names, self._present_names, strict=True):
            context.set_input_shape(past_name, kv_shape)
            context.set_tensor_address(past_name, self._kv.ptrs[f"{past_name}/{self._parity}"][0])
            context.set_tensor_address(present_name, self._kv.ptrs[f"{past_name}/{1 - self._parity}"][0])

    def _step(self, phase: str, seq: int) -> np.ndarray:
        context = self._contexts[phase]
        key = (self._seq_len, self._parity)
        graph = self._graphs.get(key) if phase == "decode" and self._use_graphs else None
        if graph is not None:
            self._graphs.move_to_end(key)
            self._device.check(self._device.drv.cuGraphLaunch(graph, self._device.stream), "cuGraphLaunch")
        else:
            self._bind(context, seq)
            # TensorRT applies shape changes on the first enqueue, so a graph is captured after one plain run.
            if not context.execute_async_v3(self._device.handle):
                raise RuntimeError(f"TensorRT failed to run the decoder ({phase})")
            if phase == "decode" and self._use_graphs:
                self._capture(context, key)
        self._device.download(self._logits, self._shared.ptrs["logits"][0])
        self._device.sync()
        self._seq_len += seq
        self._parity = 1 - self._parity
        return self._logits.astype(np.float32)

    def _capture(self, context: Any, key: tuple[int, int]) -> None:
        drv, check = self._device.drv, self._device.check
        mode = drv.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL
        check(drv.cuStreamBeginCapture(self._device.stream, mode), "cuStreamBeginCapture")
        context.execute_async_v3(self._device.handle)
        graph = check(drv.cuStreamEndCapture(self._device.stream), "cuStreamEndCapture")
        self._graphs[key] = check(drv.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        drv.cuGraphDestroy(graph)
        if len(self._graphs) > _MAX_GRAPHS:
            _, oldest = self._graphs.popitem(last=False)
            drv.cuGraphExecDestroy(oldest)


def _load_engine(runtime: Any, path: Path, component: str, package_dir: Path, precision: str) -> Any:
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise PackageError(f"TensorRT could not load the {component} engine {path.name}; rebuild the engines with "
                           f"`{rebuild_command(package_dir, precision)}`")
    return engine


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
               for c in _ENGINE_COMPONENTS}
    profiles = {p["name"]: i for i, p in enumerate(record["engines"]["decoder"]["profiles"])}
    embed = TrtSession(engines["embed"], cuda, "embed")
    return PackageSessions(
        vision=TrtSession(engines["vision"], cuda, "vision"),
        connector=TrtSession(engines["connector"], cuda, "connector"),
        embed=embed,
        decoder=TrtDecoderSession(engines["decoder"], embed, manifest.decoder, cuda, profiles, cuda_graph),
        backend="",
        details={"tensorrt_version": trt.__version__, "precision": precision, "cuda_graph": cuda_graph,
                 "gpu": record.get("gpu_name")},
    )

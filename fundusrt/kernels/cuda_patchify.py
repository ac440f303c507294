"""CUDA patching without PyTorch: the kernels of kernels/cuda/patchify.cu launched through cuda-python.

`patchify_cuda(image, cfg)` runs the same TilePlan as the NumPy path (`fundusrt.kernels.patchify`) and
leaves the normalised NCHW tiles in device memory, exposed through `__cuda_array_interface__` and a raw
pointer so TensorRT / onnxruntime-CUDA consume them without a host round trip. The module image comes
from a prebuilt nvcc fatbin when one matches the source, else from NVRTC (cached on disk). Importing
this module needs nothing beyond NumPy; cuda-python is imported when a CudaPatchifier is created.
"""

from __future__ import annotations

import ctypes
import functools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fundusrt._deps import require
from fundusrt.config import TilingConfig
from fundusrt.kernels.cuda.build import find_fatbin, nvrtc_compile
from fundusrt.kernels.cuda.tables import LaunchTables, build_launch_tables
from fundusrt.kernels.patchify import normalisation_lut
from fundusrt.kernels.roi import check_image, roi_from_sample, subsample_step
from fundusrt.kernels.tiling import TilePlan, plan_tiles

_KERNELS = ("frt_axis_coeffs", "frt_first_pass", "frt_tiles_f32", "frt_tiles_f16", "frt_roi_sample")
_DTYPES = {np.dtype(np.float32): "frt_tiles_f32", np.dtype(np.float16): "frt_tiles_f16"}
_TILE_BLOCK = (32, 8)
_ROW_BLOCK = 128
_ROI_BLOCK_Y = 8


class CudaError(RuntimeError):
    """A CUDA driver call failed, or no usable GPU / driver is present."""


def _driver() -> Any:
    return require("cuda.bindings.driver", "running the CUDA patching kernels")


def check_cuda(result: tuple, what: str) -> Any:
    """Unwrap a cuda-python (CUresult, *values) tuple, raising CudaError with the driver's message."""
    drv = _driver()
    status, *values = result
    if status != drv.CUresult.CUDA_SUCCESS:
        _, text = drv.cuGetErrorString(status)
        raise CudaError(f"{what} failed: {status.name} ({text.decode() if text else 'no description'})")
    return values[0] if len(values) == 1 else tuple(values)


def _free(ptr: Any, stream: Any, pooled: bool) -> None:
    """Free device memory: stream-ordered for a pool allocation, else after the stream's work is done."""
    drv = _driver()
    if pooled:
        check_cuda(drv.cuMemFreeAsync(ptr, stream), "cuMemFreeAsync")
    else:
        check_cuda(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")
        check_cuda(drv.cuMemFree(ptr), "cuMemFree")


@dataclass
class CudaPatches:
    """Normalised tiles in device memory, (num_tiles, 3, S, S) NCHW, owned by this object.

    Attributes:
        ptr: device address of the first element.
        shape: (num_tiles, 3, tile_size, tile_size).
        dtype: np.float32 or np.float16.
        plan: the TilePlan that produced the tiles.
        stream: CUstream handle the tiles are ordered on (0 when the call synchronised).
        device: CUDA device ordinal.
        pooled: allocated with cuMemAllocAsync (freed stream-ordered), else with cuMemAlloc.
    """

    ptr: int
    shape: tuple[int, int, int, int]
    dtype: np.dtype
    plan: TilePlan
    stream: int
    device: int
    pooled: bool
    _freed: bool = field(default=False, repr=False)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def num_tiles(self) -> int:
        return self.shape[0]

    @property
    def pixel_values(self) -> CudaPatches:
        """What a session takes as its pixel input: these patches themselves, bound by device pointer."""
        return self

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        """CUDA Array Interface v3; `stream` is None when the data is already complete."""
        if self._freed:
            raise CudaError("these CudaPatches were closed; their device memory is gone")
        return {
            "shape": self.shape,
            "typestr": self.dtype.str,
            "data": (self.ptr, False),
            "version": 3,
            "strides": None,
            "stream": self.stream or None,
        }

    def to_host(self) -> np.ndarray:
        """Copy the tiles to a new host array (waits for the producing stream)."""
        if self._freed:
            raise CudaError("these CudaPatches were closed; their device memory is gone")
        drv = _driver()
        out = np.empty(self.shape, dtype=self.dtype)
        check_cuda(drv.cuStreamSynchronize(drv.CUstream(self.stream)), "cuStreamSynchronize")
        check_cuda(drv.cuMemcpyDtoH(out.ctypes.data, drv.CUdeviceptr(self.ptr), self.nbytes), "cuMemcpyDtoH")
        return out

    def close(self) -> None:
        """Free the device memory (stream-ordered where pooled); safe to call twice."""
        if not self._freed:
            self._freed = True
            drv = _driver()
            _free(drv.CUdeviceptr(self.ptr), drv.CUstream(self.stream), self.pooled)

    def __enter__(self) -> CudaPatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CudaPatchifier:
    """The kernels loaded on one GPU (its primary context, shared with TensorRT / onnxruntime).

    Args:
        device: CUDA device ordinal.

    Raises:
        MissingDependencyError: cuda-python is not installed (extra "gpu").
        CudaError: no driver, no such device, or the module does not load.
    """

    def __init__(self, device: int = 0) -> None:
        drv = _driver()
        try:
            initialised = drv.cuInit(0)
        except Exception as exc:  # cuda-python raises its own loader error when libcuda is absent
            raise CudaError(f"no CUDA driver could be loaded ({exc}); use the CPU path instead") from exc
        check_cuda(initialised, "cuInit")
        self.device = device
        self._dev = check_cuda(drv.cuDeviceGet(device), f"cuDeviceGet({device})")
        attr = drv.CUdevice_attribute
        major = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self._dev), "cc")
        minor = check_cuda(drv.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self._dev), "cc")
        self.arch = 10 * major + minor
        # cuMemAllocAsync needs stream-ordered memory pools, which not every device/driver offers
        pools = attr.CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED
        self.pooled = bool(check_cuda(drv.cuDeviceGetAttribute(pools, self._dev), "memory pools attribute"))
        self._ctx = check_cuda(drv.cuDevicePrimaryCtxRetain(self._dev), "cuDevicePrimaryCtxRetain")
        self._activate()
        self._module = self._load_module()
        self._functions = {
            name: check_cuda(drv.cuModuleGetFunction(self._module, name.encode()), f"cuModuleGetFunction({name})")
            for name in _KERNELS
        }

    def _activate(self) -> None:
        check_cuda(_driver().cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")

    def _load_module(self) -> Any:
        drv = _driver()
        fatbin = find_fatbin()
        if fatbin is not None:
            data = np.frombuffer(fatbin.read_bytes(), dtype=np.uint8)
            status, module = drv.cuModuleLoadData(data.ctypes.data)
            if status == drv.CUresult.CUDA_SUCCESS:
                return module
            # a fatbin without code for this GPU: fall through to NVRTC for this architecture
        image, _ = nvrtc_compile(self.arch)
        data = np.frombuffer(image, dtype=np.uint8)  # PTX from NVRTC already ends with its NUL
        return check_cuda(drv.cuModuleLoadData(data.ctypes.data), f"cuModuleLoadData (sm_{self.arch})")

    # -- small helpers over the driver API --------------------------------------------------------

    def _alloc(self, nbytes: int, stream: Any) -> Any:
        drv, size = _driver(), max(int(nbytes), 1)
        if self.pooled:
            return check_cuda(drv.cuMemAllocAsync(size, stream), f"cuMemAllocAsync({nbytes})")
        return check_cuda(drv.cuMemAlloc(size), f"cuMemAlloc({nbytes})")

    def free(self, ptr: Any, stream: Any) -> None:
        """Free what `_alloc` / `_upload` returned, ordered after the work queued on `stream`."""
        _free(ptr, stream, self.pooled)

    def _upload(self, array: np.ndarray, stream: Any) -> Any:
        array = np.ascontiguousarray(array)
        ptr = self._alloc(array.nbytes, stream)
        check_cuda(_driver().cuMemcpyHtoDAsync(ptr, array.ctypes.data, array.nbytes, stream), "cuMemcpyHtoDAsync")
        return ptr

    def _launch(self, name: str, grid: tuple[int, int, int], block: tuple[int, int, int], stream: Any,
                args: list[tuple[Any, Any]]) -> None:
        values = tuple(int(v) if kind is ctypes.c_void_p else v for v, kind in args)
        kinds = tuple(kind for _, kind in args)
        check_cuda(
            _driver().cuLaunchKernel(self._functions[name], *grid, *block, 0, stream, (values, kinds), 0),
            f"launch {name}",
        )

    # -- public API ---------------------------------------------------------------------------------

    def find_roi(self, image: np.ndarray, threshold: float | None = None,
                 stream: int | None = None) -> tuple[int, int, int, int] | None:
        """GPU find_fundus_roi (same definition): (x0, y0, x1, y1) or None."""
        check_image(image)
        drv = _driver()
        self._activate()
        cu_stream = drv.CUstream(stream or 0)
        d_image = self._upload(image, cu_stream)
        try:
            return self._roi_on_device(d_image, image.shape[0], image.shape[1], threshold, cu_stream)
        finally:
            self.free(d_image, cu_stream)

    def _roi_on_device(self, d_image: Any, height: int, width: int, threshold: float | None,
                       stream: Any) -> tuple[int, int, int, int] | None:
        """Gather image[::step, ::step] on the device (at most 1024 px a side) and decide the box on the host."""
        drv = _driver()
        step = subsample_step(height, width)
        rows, cols = -(-height // step), -(-width // step)
        sample = np.empty((rows, cols, 3), dtype=np.uint8)
        d_sample = self._alloc(sample.nbytes, stream)
        try:
            self._launch("frt_roi_sample", (-(-cols // 32), -(-rows // _ROI_BLOCK_Y), 1), (32, _ROI_BLOCK_Y, 1), stream, [
                (d_image, ctypes.c_void_p), (width, ctypes.c_int), (step, ctypes.c_int), (rows, ctypes.c_int),
                (cols, ctypes.c_int), (d_sample, ctypes.c_void_p),
            ])
            check_cuda(drv.cuMemcpyDtoHAsync(sample.ctypes.data, d_sample, sample.nbytes, stream), "cuMemcpyDtoHAsync")
            check_cuda(drv.cuStreamSynchronize(stream), "cuStreamSynchronize")
        finally:
            self.free(d_sample, stream)
        return roi_from_sample(sample, step, height, width, threshold)

    def patchify(self, image: np.ndarray, cfg: TilingConfig, *, dtype: type | np.dtype = np.float32,
                 stream: int | None = None) -> CudaPatches:
        """Normalised tiles of a host image under `cfg`, left on the GPU; see patchify_cuda."""
        check_image(image)
        drv = _driver()
        self._activate()
        cu_stream = drv.CUstream(stream or 0)
        d_image = self._upload(image, cu_stream)
        try:
            return self.patchify_on_device(int(d_image), image.shape[0], image.shape[1], cfg, dtype=dtype,
                                           stream=stream)
        finally:
            self.free(d_image, cu_stream)

    def patchify_on_device(self, image_ptr: int, height: int, width: int, cfg: TilingConfig, *,
                           dtype: type | np.dtype = np.float32, stream: int | None = None) -> CudaPatches:
        """Like patchify, for an RGB uint8 HWC image already in device memory (e.g. a GPU JPEG decode).

        Args:
            image_ptr: device address of a contiguous (height, width, 3) uint8 array.
            height, width: its size.
            cfg, dtype, stream: as for patchify_cuda.
        """
        out_dtype = np.dtype(dtype)
        if out_dtype not in _DTYPES:
            raise ValueError(f"dtype must be float32 or float16, got {out_dtype}")
        if height < 1 or width < 1:
            raise ValueError(f"image size must be positive, got {width}x{height}")
        drv = _driver()
        self._activate()
        cu_stream = drv.CUstream(stream or 0)
        roi = self._roi_on_device(image_ptr, height, width, None, cu_stream) if cfg.roi_crop else None
        plan = plan_tiles(width, height, cfg, roi=roi)
        tables = build_launch_tables(plan, width, height)
        lut = normalisation_lut(cfg.mean, cfg.std, out_dtype)
        out = self._alloc(plan.num_tiles * 3 * plan.tile_size**2 * out_dtype.itemsize, cu_stream)
        temporaries: list = []
        try:
            self._run(temporaries, image_ptr, width, tables, lut, _DTYPES[out_dtype], out, cu_stream)
        except BaseException:
            self.free(out, cu_stream)
            raise
        finally:
            for ptr in temporaries:
                self.free(ptr, cu_stream)
        if stream is None:
            check_cuda(drv.cuStreamSynchronize(cu_stream), "cuStreamSynchronize")
        size = plan.tile_size
        return CudaPatches(int(out), (plan.num_tiles, 3, size, size), out_dtype, plan, int(stream or 0), self.device,
                           self.pooled)

    def _run(self, temporaries: list, d_image: Any, width: int, tables: LaunchTables, lut: np.ndarray,
             tiles_kernel: str, out: Any, stream: Any) -> None:
        params = np.concatenate([tables.views.ravel(), tables.jobs.ravel(), tables.tiles.ravel()])
        d_params = self._upload(params, stream)
        temporaries.append(d_params)
        views = int(d_params)
        jobs = views + 4 * tables.views.size
        tiles = jobs + 4 * tables.jobs.size
        d_lut = self._upload(lut, stream)
        temporaries.append(d_lut)
        d_tables = self._alloc(4 * tables.table_ints, stream)
        temporaries.append(d_tables)
        d_tmp = self._alloc(tables.tmp_bytes, stream)
        temporaries.append(d_tmp)
        ptr = ctypes.c_void_p
        self._launch("frt_axis_coeffs", (-(-tables.max_job_outputs // _ROW_BLOCK), len(tables.jobs), 1),
                     (_ROW_BLOCK, 1, 1), stream, [(jobs, ptr), (d_tables, ptr)])
        self._launch("frt_first_pass", (-(-tables.max_tmp_width // _ROW_BLOCK), tables.max_tmp_height, len(tables.views)),
                     (_ROW_BLOCK, 1, 1), stream,
                     [(d_image, ptr), (width, ctypes.c_int), (views, ptr), (d_tables, ptr), (d_tmp, ptr)])
        size = tables.tile_size
        bx, by = _TILE_BLOCK
        self._launch(tiles_kernel, (-(-size // bx), -(-size // by), tables.num_tiles), (bx, by, 1), stream, [
            (views, ptr), (d_tables, ptr), (d_tmp, ptr), (tiles, ptr), (size, ctypes.c_int),
            (tables.pad_rgb, ctypes.c_int), (d_lut, ptr), (out, ptr),
        ])


@functools.cache
def default_patchifier(device: int = 0) -> CudaPatchifier:
    """The process-wide CudaPatchifier for `device` (module loading costs a few ms once)."""
    return CudaPatchifier(device)


def patchify_cuda(image: np.ndarray, cfg: TilingConfig, *, dtype: type | np.dtype = np.float32,
                  stream: int | None = None, device: int = 0) -> CudaPatches:
    """GPU twin of kernels.patchify: normalised NCHW tiles in device memory.

    Args:
        image: RGB uint8 array (H, W, 3) on the host.
        cfg: tiling policy, tile size, mean/std, roi_crop.
        dtype: np.float32 or np.float16.
        stream: CUstream handle to order the work on; None runs on the default stream and waits.
        device: CUDA device ordinal.

    Returns:
        CudaPatches (free with close() or a with-block).

    Raises:
        ValueError: bad image or dtype. CudaError: no usable GPU. MissingDependencyError: no cuda-python.
    """
    return default_patchifier(device).patchify(image, cfg, dtype=dtype, stream=stream)


def find_fundus_roi_cuda(image: np.ndarray, threshold: float | None = None, device: int = 0) -> tuple[int, int, int, int] | None:
    """GPU twin of kernels.find_fundus_roi."""
    return default_patchifier(device).find_roi(image, threshold)

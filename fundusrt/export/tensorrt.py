"""`build_engines`: a model package's ONNX components -> TensorRT engines, recorded in its manifest.

Written against the documented TensorRT Python API common to 10.x (JetPack 6) and 11: networks are
strongly typed (precision comes from the ONNX itself, no builder precision flags and no implicit
INT8 calibration, which 11 removed), so

- `fp16` converts an fp32 package's components to float16 internally (I/O stays float32), and
- `int8` builds a package from `fundusrt calibrate` as is: its explicit Q/DQ nodes are the INT8
  layers, the rest runs in the precision the ONNX states.

Every dynamic input gets an optimisation profile (`fundusrt.runtime.backends.profiles`), with two
decoder profiles, `prefill` and `decode`, which the TensorRT backend selects per phase. A persistent
timing cache makes rebuilds fast; the workspace limit keeps Jetson builds inside the device's memory.
Importing this module needs neither torch nor TensorRT: engines are built on the device, which has no torch.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.manifest import Manifest, PackageError, atomic_write_bytes, sha256_file
from fundusrt.runtime.backends.profiles import Profile, plan_profiles
from fundusrt.runtime.backends.trt_engines import TRT_KEY, EngineTarget, current_target

PRECISIONS = ("fp16", "int8")
COMPONENTS = ("vision", "connector", "embed", "decoder")


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a component; the message carries TensorRT's own errors."""


def check_precision(manifest: Manifest, precision: str) -> None:
    """Raise PackageError unless engines of `precision` can be built from this package."""
    if precision not in PRECISIONS:
        raise PackageError(f"unknown engine precision {precision!r}; choose one of {PRECISIONS}")
    quantised = manifest.precision != "fp32"
    if precision == "fp16" and quantised:
        raise PackageError(f"--fp16 builds from the fp32 package; this one is {manifest.precision}. Use --int8 here "
                           "or point build-engines at the fp32 export")
    if precision == "int8":
        if not quantised:
            raise PackageError("--int8 needs a calibrated Q/DQ package; make one with "
                               "`fundusrt calibrate PKG --images STUDIES --out PKG_INT8` and build that")
        modes = {c: s.get("mode") for c, s in manifest.extra.get("quantization", {}).get("components", {}).items()}
        weight_only = [c for c, mode in modes.items() if mode not in ("qdq", "int4-dq", "fp32")]
        if weight_only:
            raise PackageError(f"components {weight_only} use ONNX Runtime's weight-only MatMulNBits, which TensorRT "
                               "cannot build; calibrate with --decoder qdq or int4-dq for TensorRT")


def default_timing_cache(target: EngineTarget) -> Path:
    """A timing cache per TensorRT version and GPU, in $FUNDUSRT_CACHE/tensorrt beside the CUDA kernel cache."""
    from fundusrt.kernels.cuda.build import cache_dir

    name = f"timing-trt{target.tensorrt_version}-sm{target.compute_capability.replace('.', '')}.cache"
    return cache_dir().parent / "tensorrt" / name


def _fp16_copy(onnx_path: Path, workdir: Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    out = workdir / onnx_path.name
    onnx.save(model, str(out), save_as_external_data=True, location=f"{onnx_path.name}.data")
    return out


def _build_one(trt: Any, onnx_path: Path, profiles: list[Profile], workspace_bytes: int, cache: bytes,
               component: str) -> tuple[bytes, bytes]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {component} ({onnx_path.name}): {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if not config.set_timing_cache(config.create_timing_cache(cache), False):
        raise EngineBuildError(f"TensorRT rejected the timing cache for {component}; delete it or pass another "
                               "--timing-cache")
    for index, profile in enumerate(profiles):
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        # the profile's index must be its position: the backend selects profiles by the manifest's order
        if config.add_optimization_profile(trt_profile) != index:
            raise EngineBuildError(f"TensorRT rejected optimisation profile {profile.name!r} of {component}: "
                                   f"{profile.to_dict()['shapes']}")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(f"TensorRT failed to build the {component} engine (see its log above); a larger "
                               "--workspace-mib or smaller --max-tiles/--max-seq-len at export may help")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(package_dir: str | Path, precision: str, *, workspace_mib: int = 2048,
                  timing_cache: str | Path | None = None, opt_tiles: int | None = None,
                  opt_prompt: int | None = None, device: int = 0) -> dict[str, Any]:
    """Build one engine per component into the package and record them in its manifest.

    Args:
        package_dir: the package (fp32 for "fp16", a `fundusrt calibrate` output for "int8").
        precision: "fp16" or "int8".
        workspace_mib: TensorRT workspace limit (keep it well below a Jetson's shared memory).
        timing_cache: timing cache file, read and updated (default: per TensorRT version and GPU).
        opt_tiles: tiles the vision engines are tuned for.
        opt_prompt: prompt length the decoder is tuned for.
        device: CUDA device ordinal.

    Returns:
        the manifest record (also saved as manifest.extra["tensorrt"]).
    """
    trt = require("tensorrt", "building TensorRT engines")
    package = Path(package_dir)
    manifest = Manifest.load(package)
    manifest.verify(package)
    check_precision(manifest, precision)
    if workspace_mib < 64:
        raise PackageError(f"workspace_mib must be >= 64, got {workspace_mib}")
    profiles = plan_profiles(manifest, opt_tiles=opt_tiles, opt_prompt=opt_prompt)
    target = current_target(device)
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(target)
    cache = cache_path.read_bytes() if cache_path.is_file() else b""
    engines = {}
    with tempfile.TemporaryDirectory(prefix="fundusrt-trt-") as workdir:
        for component in COMPONENTS:
            onnx_path = package / manifest.components[component].file
            if precision == "fp16":
                onnx_path = _fp16_copy(onnx_path, Path(workdir))
            engine, cache = _build_one(trt, onnx_path, profiles[component], workspace_mib << 20, cache, component)
            path = package / f"{component}.{precision}.engine"
            atomic_write_bytes(path, engine)
            engines[component] = {"file": path.name, "sha256": sha256_file(path),
                                  "profiles": [p.to_dict() for p in profiles[component]]}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache_path, cache)
    record = {"precision": precision, **asdict(target), "workspace_mib": workspace_mib,
              "strongly_typed": True, "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "engines": engines}
    manifest.extra[TRT_KEY] = record
    manifest.save(package)
    return record


def add_arguments(parser: Any) -> None:
    """Arguments of the build-engines verb."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--fp16", action="store_const", const="fp16", dest="precision",
                       help="fp16 engines from an fp32 package")
    group.add_argument("--int8", action="store_const", const="int8", dest="precision",
                       help="INT8 engines from a `fundusrt calibrate` Q/DQ package")
    parser.add_argument("package", help="the model package; engines and the manifest record are written into it")
    parser.add_argument("--workspace-mib", type=int, default=2048, help="TensorRT workspace limit (MiB)")
    parser.add_argument("--timing-cache", default=None, help="timing cache file (default: per TensorRT version and GPU)")
    parser.add_argument("--opt-tiles", type=int, default=None, help="tiles the vision engines are tuned for")
    parser.add_argument("--opt-prompt", type=int, default=None, help="prompt length the decoder is tuned for")
    parser.add_argument("--device", type=int, default=0, help="CUDA device ordinal")


def main(args: Any) -> int:
    """Build the engines; print what was recorded, or why not (exit 1)."""
    import sys

    try:
        record = build_engines(args.package, args.precision, workspace_mib=args.workspace_mib,
                               timing_cache=args.timing_cache, opt_tiles=args.opt_tiles, opt_prompt=args.opt_prompt,
                               device=args.device)
    except (PackageError, EngineBuildError, ImportError) as exc:
        print(f"fundusrt build-engines: {exc}", file=sys.stderr)
        return 1
    print(f"{record['precision']} engines for TensorRT {record['tensorrt_version']} on {record['gpu_name']} "
          f"(sm {record['compute_capability']}):")
    for component, entry in record["engines"].items():
        print(f"  {component}: {entry['file']} sha256 {entry['sha256'][:16]}")
    return 0

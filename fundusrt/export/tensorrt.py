"""`build_engines`: a model package's ONNX components -> TensorRT engines, recorded in its manifest.

Written against the documented TensorRT Python API common to 10.x (JetPack 6) and 11: networks are
strongly typed (precision comes from the ONNX itself, no builder precision flags and no implicit
INT8 calibration, which 11 removed), so

- `fp16` converts an fp32 package's components to float16 internally (I/O stays float32), and
- `int8` builds a package from `fundusrt calibrate` as is: its explicit Q/DQ nodes are the INT8
  layers, the rest runs in the precision the ONNX states.

Every dynamic input gets an optimisation profile: tiles 1..max for vision and connector, prompt
lengths for embed, and two decoder profiles, `prefill` (a whole prompt over an empty or short
cache) and `decode` (one token over a cache up to max_seq_len), which the TensorRT backend selects
per phase. A persistent timing cache makes rebuilds fast; the workspace limit keeps Jetson builds
inside the device's memory. The profile computation needs no TensorRT and is tested everywhere.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fundusrt._deps import require
from fundusrt.manifest import Manifest, PackageError, TensorSpec, atomic_write_bytes, sha256_file
from fundusrt.runtime.backends.tensorrt import TRT_KEY, EngineTarget, current_target

PRECISIONS = ("fp16", "int8")
COMPONENTS = ("vision", "connector", "embed", "decoder")
# Text around the image tokens assumed by the default "opt" prompt length (system + question).
TEXT_TOKENS_OPT = 64


class EngineBuildError(RuntimeError):
    """TensorRT could not parse or build a component; the message carries TensorRT's own errors."""


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                                              for k, v in self.shapes.items()}}


def max_image_tiles(manifest: Manifest) -> int:
    """Most tiles one image can produce: grid tiles plus the thumbnail / global view."""
    tiling = manifest.preprocessing
    return tiling.max_tiles + int(tiling.use_thumbnail)


def _resolve(spec: TensorSpec, dims: dict[str, int], component: str) -> tuple[int, ...]:
    shape = []
    for dim in spec.shape:
        if isinstance(dim, int):
            shape.append(dim)
        elif dim in dims:
            shape.append(dims[dim])
        else:
            raise PackageError(f"{component} input {spec.name} has dynamic axis {dim!r}, which the engine builder "
                               f"does not know (known: {sorted(dims)}); re-export the package with this fundusrt")
    return tuple(shape)


def _profile(name: str, inputs: list[TensorSpec], component: str, low: dict[str, int], opt: dict[str, int],
             high: dict[str, int]) -> Profile:
    return Profile(name, {t.name: (_resolve(t, low, component), _resolve(t, opt, component),
                                   _resolve(t, high, component)) for t in inputs})


def plan_profiles(manifest: Manifest, *, opt_tiles: int | None = None, opt_prompt: int | None = None
                  ) -> dict[str, list[Profile]]:
    """Optimisation profiles of every component from the manifest's shapes (batch is always 1).

    Args:
        manifest: the package manifest.
        opt_tiles: tiles the vision engines are tuned for (default: the most an image produces).
        opt_prompt: prompt length the decoder is tuned for (default: image tokens of opt_tiles + 64).
    """
    max_seq = manifest.decoder.max_seq_len
    most_tiles = max_image_tiles(manifest)
    opt_tiles = most_tiles if opt_tiles is None else opt_tiles
    if not 1 <= opt_tiles <= most_tiles:
        raise PackageError(f"opt_tiles must be in 1..{most_tiles}, got {opt_tiles}")
    if opt_prompt is None:
        opt_prompt = min(opt_tiles * manifest.prompt.tokens_per_tile + TEXT_TOKENS_OPT, max_seq)
    if not 1 <= opt_prompt <= max_seq:
        raise PackageError(f"opt_prompt must be in 1..{max_seq}, got {opt_prompt}")
    comps = manifest.components
    profiles = {
        c: [_profile("tiles", comps[c].inputs, c, {"num_tiles": 1}, {"num_tiles": opt_tiles},
                     {"num_tiles": most_tiles})]
        for c in ("vision", "connector")
    }
    profiles["embed"] = [_profile("tokens", comps["embed"].inputs, "embed", {"batch": 1, "seq": 1},
                                  {"batch": 1, "seq": opt_prompt}, {"batch": 1, "seq": max_seq})]
    decoder = comps["decoder"].inputs
    # prefill: a whole prompt over an empty cache (or a short shared prefix, as ask_many forks it).
    prefill = _profile("prefill", decoder, "decoder",
                       {"batch": 1, "seq": 1, "past_seq": 0, "total_seq": 1},
                       {"batch": 1, "seq": opt_prompt, "past_seq": 0, "total_seq": opt_prompt},
                       {"batch": 1, "seq": max_seq, "past_seq": max_seq - 1, "total_seq": max_seq})
    # decode: one token over a cache of any length up to max_seq_len.
    decode = _profile("decode", decoder, "decoder",
                      {"batch": 1, "seq": 1, "past_seq": 0, "total_seq": 1},
                      {"batch": 1, "seq": 1, "past_seq": opt_prompt, "total_seq": min(opt_prompt + 1, max_seq)},
                      {"batch": 1, "seq": 1, "past_seq": max_seq - 1, "total_seq": max_seq})
    profiles["decoder"] = [prefill, decode]
    return profiles


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
        weight_only = [c for c, mode in modes.items() if mode not in ("qdq", "fp32")]
        if weight_only:
            raise PackageError(f"components {weight_only} use ONNX Runtime's weight-only MatMulNBits, which TensorRT "
                               "cannot build; calibrate with --decoder qdq for TensorRT")


def default_timing_cache(target: EngineTarget) -> Path:
    """A timing cache per TensorRT version and GPU, kept beside the calibration cache."""
    from fundusrt.calibration.package import default_cache_dir

    name = f"timing-trt{target.tensorrt_version}-sm{target.compute_capability.replace('.', '')}.cache"
    return default_cache_dir().parent / "tensorrt" / name


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
    timing_cache = config.create_timing_cache(cache)
    config.set_timing_cache(timing_cache, False)
    for profile in profiles:
        trt_profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile.shapes.items():
            trt_profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(trt_profile)
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

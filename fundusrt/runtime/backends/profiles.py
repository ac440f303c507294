"""TensorRT optimisation profiles from a package's manifest: for `build-engines` and for ONNX Runtime's TensorRT EP.

Every dynamic input gets a (min, opt, max) range: tiles 1..max for vision and connector, prompt
lengths for embed, and two decoder profiles, `prefill` (a whole prompt over an empty or short cache)
and `decode` (one token over a cache up to max_seq_len). Engines built by fundusrt keep both decoder
profiles and select one per phase; the ORT TensorRT EP gets one range per input covering both, so it
builds its engine once instead of again whenever the decode length leaves the range it first saw.
Nothing here needs TensorRT or onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fundusrt.manifest import Manifest, PackageError, TensorSpec

# Text around the image tokens assumed by the default "opt" prompt length (system + question).
TEXT_TOKENS_OPT = 64
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class Profile:
    """One optimisation profile: input name -> (min, opt, max) shapes."""

    name: str
    shapes: dict[str, Shapes]

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


def covering_profile(profiles: list[Profile]) -> Profile:
    """One profile whose ranges cover all of `profiles`; its opt point is the last one's (decode, the hot path)."""
    names = profiles[0].shapes.keys()
    shapes = {}
    for name in names:
        lows, highs = zip(*((p.shapes[name][0], p.shapes[name][2]) for p in profiles), strict=True)
        shapes[name] = (tuple(map(min, zip(*lows, strict=True))), profiles[-1].shapes[name][1],
                        tuple(map(max, zip(*highs, strict=True))))
    return Profile("+".join(p.name for p in profiles), shapes)


def ort_trt_options(profile: Profile, cache_dir: Path) -> dict[str, str]:
    """ONNX Runtime TensorRT EP options: explicit shape ranges (trtexec's "name:AxB,..." syntax) and a disk cache."""
    def spec(point: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shapes[point]))}" for name, shapes in profile.shapes.items())

    return {"trt_profile_min_shapes": spec(0), "trt_profile_opt_shapes": spec(1), "trt_profile_max_shapes": spec(2),
            "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache_dir),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache_dir)}


def with_trt_profiles(providers: list[Any], manifest: Manifest, component: str) -> list[Any]:
    """`providers` with the TensorRT EP (if listed) given the component's covering profile and the engine cache
    ($FUNDUSRT_CACHE/ort-trt: engines then survive the process, which matters where a build takes minutes)."""
    if "TensorrtExecutionProvider" not in providers:
        return providers
    from fundusrt.kernels.cuda.build import cache_dir

    options = ort_trt_options(covering_profile(plan_profiles(manifest)[component]), cache_dir().parent / "ort-trt")
    return [("TensorrtExecutionProvider", options) if p == "TensorrtExecutionProvider" else p for p in providers]

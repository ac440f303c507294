"""Plain configuration dataclasses shared by the build side and the runtime.

Each validates itself in `__post_init__`; `from_dict` ignores unknown keys so that newer
manifests and checkpoints still load.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

TILING_POLICIES = ("internvl_dynamic", "anyres", "single")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass `cls` from `data`, ignoring keys it does not know."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class TilingConfig:
    """How an image becomes tiles for the vision tower.

    Attributes:
        policy: "internvl_dynamic" (InternVL/FundusExpert), "anyres" (LLaVA-NeXT/EyecareGPT) or
            "single" (one stretched tile).
        tile_size: side of a square tile in pixels (448 InternViT, 384 SigLIP).
        min_tiles, max_tiles: bounds on grid tiles for internvl_dynamic (max_num 12 at inference).
        use_thumbnail: add a whole-image view (InternVL: last, only when more than one tile;
            AnyRes: the global view, always first).
        grid_pinpoints: AnyRes candidate resolutions as (width, height) pairs.
        mean, std: per-channel normalisation applied after scaling to [0, 1].
        roi_crop: crop to the fundus field of view before tiling.
    """

    policy: str = "internvl_dynamic"
    tile_size: int = 448
    min_tiles: int = 1
    max_tiles: int = 12
    use_thumbnail: bool = True
    grid_pinpoints: list[tuple[int, int]] = field(default_factory=list)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    roi_crop: bool = False

    def __post_init__(self) -> None:
        if self.policy not in TILING_POLICIES:
            raise ValueError(f"tiling policy {self.policy!r} is not one of {TILING_POLICIES}")
        if self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        self.grid_pinpoints = [tuple(int(v) for v in p) for p in self.grid_pinpoints]  # type: ignore[misc]
        if self.policy == "anyres" and not self.grid_pinpoints:
            raise ValueError("anyres tiling needs grid_pinpoints, e.g. [[384, 768], [768, 384], [768, 768]]")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got {self.mean}, {self.std}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d


@dataclass
class GenerationConfig:
    """Decoding settings. temperature 0 means greedy."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

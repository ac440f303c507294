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


VISION_TYPES = ("siglip", "internvit")
CONNECTOR_TYPES = ("mlp", "dense", "pixel_shuffle")
TEXT_TYPES = ("qwen2", "llama", "phi3")
IMAGE_LAYOUTS = ("flat", "anyres_unpad")


@dataclass
class VisionConfig:
    """A vision tower (transformers `SiglipVisionModel` or `InternVLVisionModel`).

    Attributes:
        type: "siglip" (no CLS token, post-layernorm unused) or "internvit" (CLS token, layer scale).
        hidden_size, num_layers, num_heads, intermediate_size: encoder shape.
        image_size, patch_size: square tile side and patch side in pixels.
        layer_norm_eps: eps of the encoder layer norms.
        hidden_act: MLP activation ("gelu_pytorch_tanh" SigLIP, "gelu" InternViT).
        qkv_bias: InternViT only: q/k/v projections carry biases (InternViT-300M: true).
        qk_norm: InternViT only: RMS-normalise q and k (InternViT-6B).
        norm_type: InternViT only: "layer_norm" or "rms_norm".
    """

    type: str = "siglip"
    hidden_size: int = 1152
    num_layers: int = 27
    num_heads: int = 16
    intermediate_size: int = 4304
    image_size: int = 384
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = ""
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_type: str = "layer_norm"

    def __post_init__(self) -> None:
        if self.type not in VISION_TYPES:
            raise ValueError(f"vision.type {self.type!r} is not one of {VISION_TYPES}")
        for name in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "image_size", "patch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"vision.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size < self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"vision.norm_type must be 'layer_norm' or 'rms_norm', got {self.norm_type!r}")
        if not self.hidden_act:
            self.hidden_act = "gelu_pytorch_tanh" if self.type == "siglip" else "gelu"

    @property
    def grid_size(self) -> int:
        """Patches per side of a tile (the patch conv drops a remainder: SigLIP 384/14 -> 27)."""
        return self.image_size // self.patch_size

    @property
    def has_cls(self) -> bool:
        """Whether the tower prepends a CLS token (dropped before the connector)."""
        return self.type == "internvit"


@dataclass
class ConnectorConfig:
    """Vision features -> language-model embeddings.

    Attributes:
        type: "mlp" (Linear-GELU-Linear on one layer), "dense" (EyecareGPT / Dense Connector: channel
            concat of the feature layer and the mean of each layer group, then Linear-GELU-Linear) or
            "pixel_shuffle" (InternVL mlp1: shuffle by downsample_ratio, LayerNorm-Linear-GELU-Linear).
        feature_layer: index into the tower's hidden_states (0 = embeddings output, -1 = last layer).
        layer_groups: dense only: hidden_states indices averaged per group, e.g. [[0..12], [13..25]].
        downsample_ratio: pixel_shuffle only: 0.5 merges 2x2 patches into one token.
    """

    type: str = "mlp"
    feature_layer: int = -1
    layer_groups: list[list[int]] = field(default_factory=list)
    downsample_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.type not in CONNECTOR_TYPES:
            raise ValueError(f"connector.type {self.type!r} is not one of {CONNECTOR_TYPES}")
        self.layer_groups = [[int(i) for i in group] for group in self.layer_groups]
        if self.type == "dense" and (not self.layer_groups or not all(self.layer_groups)):
            raise ValueError("a dense connector needs non-empty layer_groups, e.g. [[0, 1, 2], [3, 4, 5]]")
        if self.type != "dense" and self.layer_groups:
            raise ValueError(f"layer_groups only applies to a dense connector, not {self.type!r}")
        if self.type == "pixel_shuffle":
            factor = 1 / self.downsample_ratio if self.downsample_ratio > 0 else 0
            if factor < 1 or abs(factor - round(factor)) > 1e-9:
                raise ValueError(f"downsample_ratio must be 1/k for an integer k, got {self.downsample_ratio}")

    @property
    def shuffle_factor(self) -> int:
        """k for pixel shuffle: k x k patches become one token."""
        return round(1 / self.downsample_ratio)

    def feature_width(self, vision_hidden: int) -> int:
        """Channels of the vision features this connector consumes."""
        if self.type == "dense":
            return vision_hidden * (1 + len(self.layer_groups))
        if self.type == "pixel_shuffle":
            return vision_hidden * self.shuffle_factor**2
        return vision_hidden


@dataclass
class TextConfig:
    """The decoder LLM: a transformers config dict for its `type` (model_type)."""

    type: str = "qwen2"
    config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in TEXT_TYPES:
            raise ValueError(f"text.type {self.type!r} is not one of {TEXT_TYPES}")
        missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
                   if k not in self.config]
        if missing:
            raise ValueError(f"text.config lacks {missing}")

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.get("num_key_value_heads") or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(self.config.get("head_dim") or self.hidden_size // self.num_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.config["vocab_size"])


@dataclass
class ModelConfig:
    """A whole LVLM: tower, connector, decoder, preprocessing and chat format.

    Attributes:
        name: model name written into packages.
        family: "siglip-dense", "internvit-shuffle", ... (informational).
        chat_template: "chatml" (Qwen2, InternVL 2.5) or "phi3".
        system_message: default system prompt.
        image_token, image_start, image_end: special tokens around an image's feature tokens.
        stop_tokens: tokens that end generation.
        bos_token: prepended to every prompt when set (Qwen2: none).
        image_layout: how one image's tile features become prompt tokens: "flat" (tiles concatenated in
            order) or "anyres_unpad" (LLaVA-NeXT: global view, then the grid's feature map with the padding
            cropped and an `image_newline` embedding ending every row; needs anyres tiling).
        anyres_max_tiles: anyres_unpad only: LLaVA-OneVision "anyres_max_N" (N); the unpadded map is
            bilinearly shrunk when it holds more than ~N tiles of features. 0 = never shrink.
        default_questions: what `fundusrt run` asks when given no question (written into packages;
            empty: the runtime's built-in questions).
    """

    vision: VisionConfig
    connector: ConnectorConfig
    text: TextConfig
    tiling: TilingConfig
    name: str = "fundusrt-model"
    family: str = ""
    chat_template: str = "chatml"
    system_message: str = "You are an ophthalmology assistant. Describe fundus images accurately."
    image_token: str = "<IMG_CONTEXT>"
    image_start: str = "<img>"
    image_end: str = "</img>"
    stop_tokens: list[str] = field(default_factory=lambda: ["<|im_end|>", "<|endoftext|>"])
    bos_token: str | None = None
    image_layout: str = "flat"
    anyres_max_tiles: int = 0
    default_questions: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout {self.image_layout!r} is not one of {IMAGE_LAYOUTS}")
        if self.image_layout == "anyres_unpad" and not (self.tiling.policy == "anyres" and self.tiling.use_thumbnail):
            raise ValueError("image_layout 'anyres_unpad' needs anyres tiling with the global view (use_thumbnail)")
        if self.anyres_max_tiles < 0:
            raise ValueError(f"anyres_max_tiles must be >= 0, got {self.anyres_max_tiles}")
        if self.tiling.tile_size != self.vision.image_size:
            raise ValueError(f"tiling.tile_size {self.tiling.tile_size} != vision.image_size {self.vision.image_size}")
        grid = self.vision.grid_size
        if self.connector.type == "pixel_shuffle" and grid % self.connector.shuffle_factor:
            raise ValueError(f"pixel shuffle by {self.connector.shuffle_factor} needs a patch grid divisible by it, "
                             f"got {grid}x{grid}")
        depth = self.vision.num_layers
        indices = [self.connector.feature_layer] + [i for g in self.connector.layer_groups for i in g]
        bad = [i for i in indices if not -(depth + 1) <= i <= depth]
        if bad:
            raise ValueError(f"hidden_states indices {bad} are out of range for a {depth}-layer tower "
                             f"(valid: {-(depth + 1)}..{depth})")
        if not self.stop_tokens:
            raise ValueError("stop_tokens is empty: generation could never stop early")

    @property
    def tokens_per_tile(self) -> int:
        """Image feature tokens one tile contributes to the prompt."""
        tokens = self.vision.grid_size**2
        if self.connector.type == "pixel_shuffle":
            tokens //= self.connector.shuffle_factor**2
        return tokens

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["vision"] = dataclasses.asdict(self.vision)
        d["connector"] = dataclasses.asdict(self.connector)
        d["text"] = dataclasses.asdict(self.text)
        d["tiling"] = self.tiling.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from `to_dict` output, ignoring unknown keys; raises ValueError naming a missing section."""
        missing = [k for k in ("vision", "connector", "text", "tiling") if k not in data]
        if missing:
            raise ValueError(f"model config lacks sections {missing}")
        rest = {k: v for k, v in data.items() if k not in ("vision", "connector", "text", "tiling")}
        return from_dict(cls, {
            **rest,
            "vision": from_dict(VisionConfig, data["vision"]),
            "connector": from_dict(ConnectorConfig, data["connector"]),
            "text": from_dict(TextConfig, data["text"]),
            "tiling": from_dict(TilingConfig, data["tiling"]),
        })

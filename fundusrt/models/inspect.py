"""`inspect_checkpoint(path)`: what a checkpoint directory holds and whether it matches its config.

Nothing but safetensors headers is read: every tensor becomes a meta tensor of the header's shape,
goes through the layout's own `sanitize` (so renames, qkv splits and tied heads are the loader's),
and is compared with the model built from the config on the meta device (`compare_weights`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fundusrt.models.layouts.common import tensor_headers
from fundusrt.models.loader import CheckpointError, layout_module, parameters_on_meta, compare_weights, detect_layout
from fundusrt.models.lvlm import LVLM

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

    from fundusrt.config import ModelConfig

COMPONENTS = ("vision", "connector", "language_model")
# Native-name prefix -> component; everything else (image_newline, tensors a layout drops) is "other".
_PREFIXES = {"vision.": "vision", "connector.": "connector", "language_model.": "language_model"}


@dataclass
class TensorProblem:
    """One tensor that does not fit the config.

    Attributes:
        name: the model's (native) name of the tensor.
        source: the name on disk, when it differs and is known (renames keep it; splits may not).
        file: the safetensors file holding it ("" for a missing tensor).
        found: its shape as mapped by the layout (empty for a missing tensor).
        expected: shape the config implies (empty for an unexpected tensor).
        stored: shape of `source` on disk (differs from `found` when the layout splits a packed tensor).
    """

    name: str
    source: str = ""
    file: str = ""
    found: list[int] = field(default_factory=list)
    expected: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)


@dataclass
class Inspection:
    """What `fundusrt inspect` reports about a checkpoint (counts from headers, never tensor data).

    Attributes:
        path: the checkpoint directory.
        layout: the layout detected (a name of `fundusrt.models.layouts.LAYOUTS`).
        files: the safetensors files read, relative to `path` where possible.
        num_tensors: tensors in those files.
        dtypes: safetensors dtype -> number of tensors stored in it.
        parameters: elements stored per component (vision, connector, language_model, other) and total.
        expected_parameters: parameters the model built from the config has, per component and total.
        model: the architecture read from the config (tower, connector, decoder).
        tiling: policy, tile size, tile bounds, thumbnail and pinpoints.
        image: image_layout, tokens_per_tile, anyres_max_tiles.
        chat: template, system message, special tokens and their ids.
        missing, unexpected, wrong_shape: how the tensors differ from what the config needs.
    """

    path: str
    layout: str
    files: list[str]
    num_tensors: int
    dtypes: dict[str, int]
    parameters: dict[str, int]
    expected_parameters: dict[str, int]
    model: dict[str, Any]
    tiling: dict[str, Any]
    image: dict[str, Any]
    chat: dict[str, Any]
    missing: list[TensorProblem] = field(default_factory=list)
    unexpected: list[TensorProblem] = field(default_factory=list)
    wrong_shape: list[TensorProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every tensor the config needs is present with its shape and nothing else is."""
        return not (self.missing or self.unexpected or self.wrong_shape)

    def summary(self) -> str:
        """One line: the layout and whether the checkpoint matches its config."""
        if self.ok:
            return f"{self.path}: {self.layout} checkpoint, {self.parameters['total']:,} parameters, matches its config"
        return (f"{self.path}: {self.layout} checkpoint does not match its config: {len(self.missing)} missing, "
                f"{len(self.unexpected)} unexpected, {len(self.wrong_shape)} wrong-shape tensors")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with `ok` and `summary` added."""
        return {"ok": self.ok, "summary": self.summary(), **dataclasses.asdict(self)}


def _meta_tensors(headers: dict[str, tuple[tuple[int, ...], str]]) -> dict[str, torch.Tensor]:
    import torch

    # Shapes are all the comparison needs; one float dtype keeps sanitize's reshapes and splits valid.
    return {name: torch.empty(shape, device="meta") for name, (shape, _) in headers.items()}


def _component(name: str) -> str:
    return next((part for prefix, part in _PREFIXES.items() if name.startswith(prefix)), "other")


def _count(named: dict[str, torch.Tensor], total: int | None = None) -> dict[str, int]:
    """Elements per component; a tensor listed under two names (a tied head) counts once."""
    counts = dict.fromkeys((*COMPONENTS, "other"), 0)
    seen: set[int] = set()
    for name, tensor in named.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            counts[_component(name)] += tensor.numel()
    if total is not None:
        # Tensors the layout drops (unused heads, a separate tower's text model) are stored but not mapped.
        counts["other"] = total - sum(counts[c] for c in COMPONENTS)
    counts["total"] = sum(counts.values())
    return counts


def _describe_model(config: ModelConfig) -> dict[str, Any]:
    vision, connector, text = config.vision, config.connector, config.text
    shuffle = {"downsample_ratio": connector.downsample_ratio} if connector.type == "pixel_shuffle" else {}
    return {
        "vision": {"type": vision.type, "layers": vision.num_layers, "hidden_size": vision.hidden_size,
                   "heads": vision.num_heads, "image_size": vision.image_size, "patch_size": vision.patch_size},
        "connector": {"type": connector.type, "feature_layer": connector.feature_layer,
                      "layer_groups": connector.layer_groups,
                      **shuffle},
        "language_model": {"type": text.type, "layers": text.num_layers, "hidden_size": text.hidden_size,
                           "heads": text.num_heads, "kv_heads": text.num_kv_heads, "vocab_size": text.vocab_size},
    }


def _describe_chat(model: LVLM, tokenizer: Tokenizer) -> dict[str, Any]:
    config, spec = model.config, model.prompt

    def token(text: str) -> dict[str, Any] | None:
        return {"token": text, "id": tokenizer.token_to_id(text)} if text else None

    return {
        "template": config.chat_template, "system_message": config.system_message,
        "image_token": {"token": spec.image_token, "id": spec.image_token_id},
        "image_start": token(config.image_start), "image_end": token(config.image_end),
        "stop_tokens": [token(t) for t in config.stop_tokens],
        "bos_token": token(config.bos_token) if config.bos_token else None,
    }


def _relative(file: Path, root: Path) -> str:
    try:
        return str(file.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(file)


def _read_headers(files: list[Path], root: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    """name -> (shape, dtype) over all files, and name -> the file (relative to `root`) holding it."""
    from safetensors import SafetensorError

    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    file_of: dict[str, str] = {}
    for file in files:
        if not file.is_file():
            raise CheckpointError(f"weights file {file} of checkpoint {root} is missing")
        try:
            found = tensor_headers([file])
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a valid safetensors file: {exc}") from exc
        headers |= found
        file_of |= dict.fromkeys(found, _relative(file, root))
    return headers, file_of


def inspect_checkpoint(path: str | Path) -> Inspection:
    """Describe a checkpoint directory and compare its tensors with its config, reading headers only.

    Raises:
        CheckpointError: the directory is of no known layout, a weights file is missing or unreadable,
            or the config cannot be read; the message says which and what to do.
    """
    root = Path(path)
    layout = detect_layout(root)
    module = layout_module(layout)
    try:
        files = module.weight_files(root)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot find the weights of checkpoint {root}: {exc}") from exc
    headers, file_of = _read_headers(files, root)
    try:
        config, tokenizer = module.read_config(root)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read the config of checkpoint {root}: {exc}") from exc
    try:
        with parameters_on_meta():
            model = LVLM(config, tokenizer)
    except ValueError as exc:
        raise CheckpointError(f"the config of checkpoint {root} does not describe a model fundusrt can build: "
                              f"{exc}") from exc
    stored = _meta_tensors(headers)
    source_of = {id(tensor): name for name, tensor in stored.items()}
    try:
        weights = module.sanitize(stored, config)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"cannot map the tensors of checkpoint {root}: {exc}") from exc

    def problem(name: str, expected: tuple[int, ...] = ()) -> TensorProblem:
        tensor = weights.get(name)
        if tensor is None:
            return TensorProblem(name, expected=list(expected))
        base = tensor._base if tensor._base is not None else tensor  # a split's rows are views of the packed tensor
        source = source_of.get(id(tensor)) or source_of.get(id(base), "")
        return TensorProblem(name, source="" if source == name else source, file=file_of.get(source, ""),
                             found=list(tensor.shape), expected=list(expected),
                             stored=list(headers[source][0]) if source else [])

    params = dict(model.named_parameters())
    mismatch = compare_weights(model, weights)
    return Inspection(
        path=str(root), layout=layout, files=[_relative(f, root) for f in files], num_tensors=len(headers),
        dtypes={dtype: sum(1 for _, d in headers.values() if d == dtype)
                for dtype in sorted({d for _, d in headers.values()})},
        parameters=_count(weights, total=sum(t.numel() for t in stored.values())),
        expected_parameters=_count(params),
        model=_describe_model(config),
        tiling={k: v for k, v in config.tiling.to_dict().items() if k not in ("mean", "std", "roi_crop")},
        image={"layout": config.image_layout, "tokens_per_tile": config.tokens_per_tile,
               "anyres_max_tiles": config.anyres_max_tiles},
        chat=_describe_chat(model, tokenizer),
        missing=[problem(name, tuple(params[name].shape)) for name in mismatch.missing],
        unexpected=[problem(name) for name in mismatch.unexpected],
        wrong_shape=[problem(name, expected) for name, _, expected in mismatch.wrong_shape],
    )

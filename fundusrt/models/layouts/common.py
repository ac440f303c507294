"""Helpers the checkpoint layouts share: config and shard files, tensor headers, tokenizers, renames."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Decoder config keys fundusrt passes to transformers; training and hub bookkeeping keys are dropped.
TEXT_KEYS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "original_max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "partial_rotary_factor", "hidden_act", "attention_bias",
    "mlp_bias", "use_sliding_window", "sliding_window", "max_window_layers", "bos_token_id", "eos_token_id",
    "pad_token_id",
)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with an error naming the file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def config_json(path: Path) -> dict[str, Any]:
    """`path/config.json`, or {} when it is missing or unreadable (for `detect`)."""
    try:
        return read_json(path / CONFIG_FILE)
    except (OSError, ValueError):
        return {}


def safetensors_files(root: Path) -> list[Path]:
    """The checkpoint's safetensors files: the shards of model.safetensors.index.json, else
    model.safetensors, else every *.safetensors in `root`.

    Raises:
        FileNotFoundError: a shard named by the index is missing, or there are no safetensors at all.
    """
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (root / name).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(shards)} shards named by {index.name} are missing from "
                                    f"{root}: {missing[:5]}; download the complete checkpoint")
        return [root / name for name in shards]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in root.glob("*.bin"))
        hint = (f" (found PyTorch pickles {bins[:3]}: convert them to safetensors first, since fundusrt does not "
                "unpickle checkpoints)") if bins else ""
        raise FileNotFoundError(f"{root} holds no safetensors weights{hint}")
    return files


def tensor_headers(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype) read from file headers only (no tensor data)."""
    from safetensors import safe_open

    headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                piece = f.get_slice(key)
                headers[key] = (tuple(piece.get_shape()), piece.get_dtype())
    return headers


def load_tokenizer(root: Path, hint: str) -> Tokenizer:
    """`root/tokenizer.json` as a `tokenizers.Tokenizer`; `hint` says how to make one when it is missing."""
    from tokenizers import Tokenizer

    path = root / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; fundusrt reads fast-tokenizer files only. {hint}")
    return Tokenizer.from_file(str(path))


def bos_token(root: Path, default: bool) -> str | None:
    """The BOS token the checkpoint's tokenizer prepends (tokenizer_config.json add_bos_token / bos_token)."""
    path = root / "tokenizer_config.json"
    tok_config = read_json(path) if path.is_file() else {}
    if not tok_config.get("add_bos_token", default):
        return None
    bos = tok_config.get("bos_token", "<s>")
    return bos.get("content") if isinstance(bos, dict) else bos


def ensure_special_token(tokenizer: Tokenizer, token: str, vocab_size: int) -> None:
    """Add `token` as a special token when the tokenizer lacks it; its id must fit the embedding table."""
    from tokenizers import AddedToken

    if tokenizer.token_to_id(token) is None:
        tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    token_id = tokenizer.token_to_id(token)
    if token_id >= vocab_size:
        raise ValueError(f"{token!r} got id {token_id}, outside the decoder's {vocab_size} embeddings; "
                         "fundusrt needs a spare embedding row to mark image positions")


def text_config(source: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The decoder config fundusrt keeps from a checkpoint's LLM config.

    Dynamic NTK rope scaling is dropped: it changes nothing up to max_position_embeddings, which export
    never exceeds, and its data-dependent frequency update cannot be traced into ONNX.
    """
    config = {k: source[k] for k in TEXT_KEYS if source.get(k) is not None}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict) and (scaling.get("type") or scaling.get("rope_type")) == "dynamic":
        del config["rope_scaling"]
    config["tie_word_embeddings"] = bool(source.get("tie_word_embeddings", False))
    config.update(overrides)
    return config


def rename(weights: dict[str, torch.Tensor], rules: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Apply the first matching (regex, replacement) rule to each name; names no rule matches are kept
    (so the loader reports them as unexpected)."""
    compiled = [(re.compile(pattern), repl) for pattern, repl in rules]
    renamed = {}
    for name, tensor in weights.items():
        for pattern, repl in compiled:
            new, count = pattern.subn(repl, name, count=1)
            if count:
                name = new
                break
        renamed[name] = tensor
    return renamed


def split_rows(tensor: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Split along the output (first) axis, checking the sizes add up."""
    if sum(sizes) != tensor.shape[0]:
        raise ValueError(f"cannot split a tensor of {tensor.shape[0]} rows into {sizes}")
    return list(tensor.split(sizes, dim=0))

"""Checkpoint layouts, one module each, dispatched by name from `fundusrt.models.loader`.

A layout module provides:
    NAME: str
    detect(path: Path) -> bool                         does this directory hold my layout?
    read_config(path: Path) -> tuple[ModelConfig, Tokenizer]
    weight_files(path: Path) -> list[Path]             safetensors files to read
    sanitize(weights: dict[str, Tensor], config) -> dict[str, Tensor]   rename to native names
"""

# Tried in order by `detect`; each detects on config.json keys that the others do not write.
LAYOUTS = ("native", "internvl_chat", "llava", "hf_internvl", "hf_llava_onevision")

"""`export_package`: a checkpoint -> a model package directory (ONNX components, tokenizer, manifest)."""

from __future__ import annotations

import dataclasses
import io
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from torch import nn

from fundusrt.export.genai import GenaiDecoderOptions, awq_scales, build_genai_decoder
from fundusrt.export.onnx import OPSET, component_exports, decoder_spec, export_component
from fundusrt.manifest import (
    COMPONENTS,
    MANIFEST_NAME,
    MCQ_PROMPT_KEY,
    ComponentSpec,
    Manifest,
    TensorSpec,
    atomic_write_bytes,
    atomic_write_text,
    publish_package,
    sha256_file,
)
from fundusrt.models.loader import CheckpointError, detect_layout, load
from fundusrt.models.lvlm import LVLM

_ONNX_DTYPES = {1: "float32", 6: "int32", 7: "int64", 10: "float16", 16: "bfloat16"}
# --dtype -> torch dtype name: fp32 runs everywhere (fastest for small CPU components); fp16/bf16 halve the
# weights for GPU and TensorRT targets (ORT CPU runs fp16 graphs, not bf16 ones).
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class ExportError(Exception):
    """The package could not be written; nothing is left at the destination."""


def _tensor_specs(values: object) -> list[TensorSpec]:
    specs = []
    for value in values:  # type: ignore[attr-defined]
        tensor_type = value.type.tensor_type
        shape: list[int | str] = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
        specs.append(TensorSpec(name=value.name, dtype=_ONNX_DTYPES.get(tensor_type.elem_type, "unknown"),
                                shape=shape))
    return specs


def _component_spec(path: Path, data: list[Path]) -> ComponentSpec:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return ComponentSpec(file=path.name, sha256=sha256_file(path), inputs=_tensor_specs(graph.input),
                         outputs=_tensor_specs(graph.output),
                         data_files={file.name: sha256_file(file) for file in data})


def _tool_versions() -> dict[str, str]:
    versions = {"onnx_opset": str(OPSET)}
    for dist in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime-genai", "fundusrt"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _write_image_newline(model: LVLM, staging: Path, connector: ComponentSpec) -> dict[str, object]:
    """anyres_unpad packages carry LLaVA-NeXT's image_newline vector as a .npy hashed with the connector."""
    if model.config.image_layout != "anyres_unpad":
        return {}
    import numpy as np

    path = staging / "image_newline.npy"
    with io.BytesIO() as buffer:
        np.save(buffer, model.image_newline.detach().float().numpy(), allow_pickle=False)
        atomic_write_bytes(path, buffer.getvalue())
    connector.data_files[path.name] = sha256_file(path)
    return {"image_newline": path.name, "anyres_max_tiles": model.config.anyres_max_tiles}


def _torch_exported_parts(model: LVLM) -> dict[str, nn.Module]:
    """The modules behind the components that torch exports beside a builder-made decoder."""
    return {"vision": model.vision, "connector": model.connector,
            "embed": model.language_model.get_input_embeddings()}


def _release(model: LVLM, component: str) -> None:
    """Free an exported component's weights (to the meta device) unless the decoder shares them (tied
    embeddings), so the builder's decoder pass does not run beside a converted copy of the vision tower."""
    part = _torch_exported_parts(model)[component]
    head = model.language_model.get_output_embeddings()
    shared = {id(p) for p in head.parameters()} if head is not None else set()
    if not shared & {id(p) for p in part.parameters()}:
        part.to("meta")


def export_package(checkpoint: str | Path, out_dir: str | Path, *, max_seq_len: int = 4096,
                   max_tiles: int | None = None, overwrite: bool = False,
                   genai_decoder: GenaiDecoderOptions | None = None, dtype: str = "fp32",
                   answers_mcq: bool = False) -> Path:
    """Export a checkpoint into a model package.

    The package is assembled in a temporary sibling directory and renamed into place at the end,
    so a failed export never leaves a partial package.

    Args:
        checkpoint: checkpoint directory (any layout `fundusrt.models.load` knows).
        out_dir: package directory to create.
        max_seq_len: longest prompt + answer the runtime may run (sizes its KV cache).
        max_tiles: most grid tiles per image (default: the checkpoint's tiling.max_tiles).
        overwrite: replace an existing `out_dir`.
        genai_decoder: build the decoder with onnxruntime-genai (weight-only INT4/INT8 or fp32, KV cache
            written in place) instead of exporting it with torch.
        dtype: "fp32", "fp16" or "bf16": the weights and activations of the torch-exported components.
            Each tensor is converted as it is read from the checkpoint, so a 16-bit checkpoint is never
            held in fp32.
        answers_mcq: the model was trained on VLMEvalKit's MCQ prompt: record it in the manifest
            (`extra["mcq_prompt"]`) so that `fundusrt bench` runs MCQ sets on the package.

    Returns:
        the package directory.
    """
    checkpoint, out = Path(checkpoint), Path(out_dir)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another --out or pass overwrite=True (--force)")
    if dtype not in DTYPES:
        raise ExportError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    import torch

    layout = detect_layout(checkpoint)
    torch_dtype = getattr(torch, DTYPES[dtype])
    if genai_decoder is None:
        model = load(checkpoint, dtype=torch_dtype, layout=layout)
    else:
        # The builder reads the decoder's layers one tensor at a time from the memory-mapped checkpoint, in
        # their stored dtype; only the vision side is converted (an 8B model is never held whole), and the
        # embedding table keeps its stored dtype too (`EmbedComponent` casts the rows it looks up).
        model = load(checkpoint, dtype=None, layout=layout)
        model.vision.to(torch_dtype)
        model.connector.to(torch_dtype)
        if model.config.image_layout == "anyres_unpad":
            model.image_newline.data = model.image_newline.data.to(torch_dtype)
    config = model.config
    max_positions = config.text.config.get("max_position_embeddings")
    if max_seq_len < 1 or (max_positions and max_seq_len > max_positions):
        raise ExportError(f"max_seq_len {max_seq_len} must be in 1..{max_positions} (the decoder's positions)")
    tiling = dataclasses.replace(config.tiling, max_tiles=max_tiles or config.tiling.max_tiles)
    if tiling.max_tiles < tiling.min_tiles:
        raise ExportError(f"max_tiles {tiling.max_tiles} is below the checkpoint's min_tiles {tiling.min_tiles}")
    image_tokens = (tiling.max_tiles + int(tiling.use_thumbnail)) * config.tokens_per_tile
    if image_tokens >= max_seq_len:
        raise ExportError(f"one image of {tiling.max_tiles} tiles needs {image_tokens} tokens, more than "
                          f"max_seq_len {max_seq_len}; raise max_seq_len or lower max_tiles")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    extra: dict[str, object] = {}
    spec = decoder_spec(model, max_seq_len)
    if genai_decoder is not None:
        spec = dataclasses.replace(spec, kv_cache="shared")
    try:
        # AWQ's statistics need the vision tower, which is released once exported
        scales = awq_scales(model, genai_decoder) if genai_decoder is not None else None
        components = {}
        for name, component in component_exports(model).items():
            if name == "decoder" and genai_decoder is not None:
                path, *data = build_genai_decoder(model, staging, spec, genai_decoder, scales)
            else:
                path, *data = export_component(component, staging / f"{name}.onnx")
                if genai_decoder is not None:
                    _release(model, name)
            components[name] = _component_spec(path, data)
        if genai_decoder is not None:
            extra["decoder_build"] = genai_decoder.describe(scales.summary if scales is not None else None)
        extra.update(_write_image_newline(model, staging, components["connector"]))
        if answers_mcq:
            extra[MCQ_PROMPT_KEY] = "vlmevalkit"
        tokenizer_path = staging / "tokenizer.json"
        atomic_write_text(tokenizer_path, model.tokenizer.to_str())
        manifest = Manifest(
            name=config.name, family=config.family or config.connector.type,
            components={name: components[name] for name in COMPONENTS},
            decoder=spec, preprocessing=tiling, prompt=model.prompt,
            precision=dtype if genai_decoder is None else f"{dtype}+decoder-{genai_decoder.precision}",
            tokenizer=tokenizer_path.name, tokenizer_sha256=sha256_file(tokenizer_path),
            default_questions=list(config.default_questions), tool_versions=_tool_versions(),
            source={"layout": layout, "checkpoint": checkpoint.resolve().name}, extra=extra,
        )
        manifest.save(staging)
        Manifest.load(staging).verify(staging)
        publish_package(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


__all__ = ["MANIFEST_NAME", "CheckpointError", "ExportError", "export_package"]

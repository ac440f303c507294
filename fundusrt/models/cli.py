"""`fundusrt inspect CHECKPOINT [--json]`: layout, sizes, preprocessing, prompt format and tensor mismatches
of a checkpoint, read from its config and safetensors headers (no weights are loaded)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fundusrt.models.inspect import Inspection, TensorProblem

SHOW = 10  # offending tensors listed per kind; --json lists all


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of the inspect verb."""
    parser.add_argument("checkpoint", help="checkpoint directory (native, InternVL chat, LLaVA, or a transformers "
                                           "InternVL / LLaVA-OneVision save_pretrained directory)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _count(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:,}"


def _parameters(counts: dict[str, int]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {_count(counts[name])}"
                     for name in ("vision", "connector", "language_model", "other", "total"))


def _token(entry: dict[str, Any] | None) -> str:
    return "none" if entry is None else f"{entry['token']} ({entry['id']})"


def _head(text: str, width: int = 60) -> str:
    flat = text.replace("\n", " ")
    return repr(flat if len(flat) <= width else flat[:width] + "...")


def render(report: Inspection) -> str:
    """The human-readable report (without the problem details, see `render_problems`)."""
    m, t, chat = report.model, report.tiling, report.chat
    v, c, lm = m["vision"], m["connector"], m["language_model"]
    dtypes = ", ".join(f"{dtype} x{n}" for dtype, n in report.dtypes.items())
    tiles = f"{t['min_tiles']}..{t['max_tiles']} tiles" + (" + thumbnail" if t["use_thumbnail"] else "")
    if t["grid_pinpoints"]:
        tiles += f", pinpoints (w x h) {' '.join(f'{w}x{h}' for w, h in t['grid_pinpoints'])}"
    groups = f", layer groups {c['layer_groups']}" if c["layer_groups"] else ""
    lines = [
        f"checkpoint  {report.path}",
        f"layout      {report.layout}",
        f"files       {len(report.files)} safetensors ({', '.join(report.files)}), "
        f"{report.num_tensors} tensors: {dtypes}",
        f"parameters  {_parameters(report.parameters)}",
        f"model       vision {v['type']} {v['layers']} layers x {v['hidden_size']}, {v['image_size']} px / "
        f"{v['patch_size']} px patches; connector {c['type']} (feature layer {c['feature_layer']}{groups}); "
        f"decoder {lm['type']} {lm['layers']} layers x {lm['hidden_size']}, {lm['heads']} heads / "
        f"{lm['kv_heads']} kv, vocab {lm['vocab_size']}",
        f"tiling      {t['policy']}, tile {t['tile_size']} px, {tiles}",
        f"image       {report.image['layout']}, {report.image['tokens_per_tile']} tokens per tile"
        + (f", anyres_max {report.image['anyres_max_tiles']}" if report.image["anyres_max_tiles"] else ""),
        f"chat        {chat['template']}, system {_head(chat['system_message'])}",
        f"tokens      image {_token(chat['image_token'])}, start {_token(chat['image_start'])}, "
        f"end {_token(chat['image_end'])}, stop {', '.join(_token(s) for s in chat['stop_tokens'])}, "
        f"bos {_token(chat['bos_token'])}",
    ]
    if report.parameters != report.expected_parameters and report.ok:
        lines.append(f"config      {_parameters(report.expected_parameters)} (stored tensors the layout drops "
                     "count as other)")
    return "\n".join(lines)


def _problem_line(p: TensorProblem) -> str:
    where = ""
    if p.source:
        where = f" (stored as {p.source}{f' {tuple(p.stored)}' if p.stored != p.found else ''})"
    where += f" in {p.file}" if p.file else ""
    if p.found and p.expected:
        return f"  {p.name}{where}: has {tuple(p.found)}, config expects {tuple(p.expected)}"
    if p.expected:
        return f"  {p.name}: config expects {tuple(p.expected)}, no file holds it"
    return f"  {p.name}{where}: {tuple(p.found)}, not part of the model the config describes"


def render_problems(report: Inspection) -> str:
    """The one-line summary, then the first offending tensors of each kind."""
    lines = [report.summary()]
    for title, items in (("missing", report.missing), ("unexpected", report.unexpected),
                         ("wrong shape", report.wrong_shape)):
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines += [_problem_line(p) for p in items[:SHOW]]
            if len(items) > SHOW:
                lines.append(f"  ... and {len(items) - SHOW} more (--json lists all)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """Print the report; exit 1 with the reason when the checkpoint is unusable or does not match its config."""
    from fundusrt._deps import require

    require("torch", "inspect")
    require("transformers", "inspect")
    from fundusrt.models.inspect import inspect_checkpoint
    from fundusrt.models.loader import CheckpointError

    try:
        report = inspect_checkpoint(args.checkpoint)
    except CheckpointError as exc:
        if args.json:
            print(json.dumps({"ok": False, "path": args.checkpoint, "error": str(exc)}, indent=2))
        else:
            print(f"fundusrt inspect: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(render(report))
        if not report.ok:
            print(render_problems(report), file=sys.stderr)
    return 0 if report.ok else 1

"""An export never holds the decoder twice: its weights stream from the memory-mapped checkpoint.

Reference: the same export of a 2-layer copy of the checkpoint measures what the process costs apart from
the decoder's weights (torch, transformers, onnx, the vision tower). A checkpoint whose InternLM2 decoder is
about 0.4 GB of bf16 must then add at most half its weight bytes to the peak RSS (the goal set for 8B
models: 0.5 x 16-bit weights + 2 GB). Loading it whole, or the builder's own save (fp32 protobuf), would
add 2-4x its bytes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._layout_fixtures import write_internvl_chat

pytest.importorskip("onnxruntime_genai")

# hidden 1024, 12 layers: 4.2 + 12.6 M parameters a layer (GQA 4:1, MLP 4096) -> about 0.2 G params, 0.4 GB bf16.
BIG = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 12, "num_attention_heads": 16,
       "num_key_value_heads": 4}


def _export_peak_rss(checkpoint: Path, out: Path) -> int:
    """Peak RSS in bytes of `fundusrt export --decoder int4` run as its own process."""
    process = subprocess.Popen([sys.executable, "-m", "fundusrt.cli", "export", str(checkpoint), "--out", str(out),
                                "--decoder", "int4", "--max-seq-len", "512"], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"export of {checkpoint.name} failed"
    return usage.ru_maxrss * 1024


def test_int4_export_adds_at_most_half_the_decoder_bytes_to_peak_rss(tmp_path: Path) -> None:
    big = write_internvl_chat(tmp_path / "big", internlm2=True, llm_sizes=BIG)
    small = write_internvl_chat(tmp_path / "small", internlm2=True, llm_sizes={**BIG, "num_hidden_layers": 2})
    weight_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    small_bytes = sum(f.stat().st_size for f in small.glob("*.safetensors"))
    baseline = _export_peak_rss(small, tmp_path / "small-pkg")
    peak = _export_peak_rss(big, tmp_path / "big-pkg")
    added, allowed = peak - baseline, 0.5 * (weight_bytes - small_bytes)
    assert added <= allowed, (f"export of a {weight_bytes / 2**20:.0f} MiB bf16 checkpoint peaked at "
                              f"{peak / 2**20:.0f} MiB, {added / 2**20:.0f} MiB above the 2-layer copy's "
                              f"{baseline / 2**20:.0f} MiB (allowed: {allowed / 2**20:.0f} MiB)")

"""Decoder speed on the CPU: fundusrt packages against llama.cpp on the same weights, same run, same threads.

    python benchmarks/bench_decoder.py --llama-cpp-src DIR [--workdir DIR] [--threads 2] [--prompt 300]
                                       [--new-tokens 64] [--contexts 256,1024,4096]

A random FundusExpert-mini decoder (Qwen2.5-0.5B shape: hidden 896, 24 layers, 14/2 heads, MLP 4864,
vocab 151,674) is written once as a native checkpoint with a tiny vision tower, then:

- fundusrt: `export_package` with the torch decoder (fp32, KV concatenated) and with onnxruntime-genai
  decoders (fp32 / int8 / int4 MatMulNBits, accuracy level 4, KV written in place);
- llama.cpp (llama-cpp-python): the same decoder weights converted by llama.cpp's own
  `convert_hf_to_gguf.py` (from the llama-cpp-python sdist: `pip download --no-binary :all:
  llama-cpp-python`, then pass its `vendor/llama.cpp`) to F32 / F16 / Q8_0, and Q4_0 by
  `llama_model_quantize`. Our tokenizer is not one the script knows, so its pre-tokenizer is named
  "qwen2" for it (the benchmark feeds token ids, never text). The script needs `pip install
  llama-cpp-python sentencepiece`.

Each engine runs in its own subprocess, one after another: the same random prompt token ids (fundusrt
embeds them with the package's embedding table, llama.cpp with the same table), greedy decoding of
--new-tokens tokens, prefill time, decode tok/s, peak RSS, and decode tok/s after each context length.
The roofline column is weight bytes per token x tok/s / this machine's measured read bandwidth.
Greedy tokens of llama.cpp F32/F16 are compared with fundusrt fp32's: equal tokens show both run the
same model. Not a CI test: it needs ~8 GiB of RAM and about 15 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FUNDUSRT = ("fp32-torch", "fp32", "int8", "int4")
LLAMA = ("F32", "F16", "Q8_0", "Q4_0")
# llama.cpp file types (llama.h: LLAMA_FTYPE_MOSTLY_Q4_0 = 2) for the quantisation the script cannot do.
LLAMA_FTYPE_Q4_0 = 2


def mini_decoder_config(vocab_size: int):
    """A tiny vision tower with the FundusExpert-mini decoder: the decoder is what is measured."""
    from fundusrt.config import TextConfig
    from fundusrt.models.tiny import tiny_config

    config = tiny_config("internvit-shuffle", vocab_size)
    config.text = TextConfig(type="qwen2", config={
        "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": vocab_size, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    })
    config.name = "bench-mini-decoder"
    return config


def prompt_ids(length: int, vocab: int, seed: int = 0) -> list[int]:
    """The same random prompt for every engine (ids below the tokenizer's own vocabulary)."""
    return [int(t) for t in np.random.default_rng(seed).integers(10, vocab, size=length)]


def worker_fundusrt(package: Path, ids: list[int], contexts: list[int], args: argparse.Namespace) -> dict:
    from fundusrt.bench.machine import peak_rss_mib
    from fundusrt.runtime.pipeline import load_package

    pipe = load_package(package, threads=args.threads)
    embed, decoder = pipe.sessions.embed, pipe.sessions.decoder

    def embeds(tokens: list[int]) -> np.ndarray:
        return embed.run({"input_ids": np.array([tokens], dtype=np.int64)})["inputs_embeds"]

    def greedy(prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
        decoder.reset()
        start = time.perf_counter()
        logits = decoder.prefill(embeds(prompt))
        prefill_ms = (time.perf_counter() - start) * 1e3
        out = [int(np.argmax(logits))]
        start = time.perf_counter()
        for _ in range(steps - 1):
            out.append(int(np.argmax(decoder.decode(out[-1]))))
        return prefill_ms, (steps - 1) / (time.perf_counter() - start), out

    greedy(ids[:16], 4)  # warm-up: first-run allocations and kernel selection
    prefill_ms, tok_s, tokens = greedy(ids, args.new_tokens)
    growth = {str(c): greedy(prompt_ids(c, 400, seed=c), 17)[1] for c in contexts}
    return {"prefill_ms": prefill_ms, "decode_tok_s": tok_s, "tokens": tokens, "context_tok_s": growth,
            "peak_rss_mib": peak_rss_mib()}


def worker_llama(gguf: Path, ids: list[int], contexts: list[int], args: argparse.Namespace) -> dict:
    import llama_cpp

    from fundusrt.bench.machine import peak_rss_mib

    n_ctx = max([len(ids), *contexts]) + args.new_tokens + 8
    llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          n_batch=512, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:
        # Llama.scores is filled only with logits_all=True; read the last position's row directly.
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))

    def greedy(prompt: list[int], steps: int) -> tuple[float, float, list[int]]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefill_ms = (time.perf_counter() - start) * 1e3
        out = [int(np.argmax(last_logits()))]
        start = time.perf_counter()
        for _ in range(steps - 1):
            llm.eval([out[-1]])
            out.append(int(np.argmax(last_logits())))
        return prefill_ms, (steps - 1) / (time.perf_counter() - start), out

    greedy(ids[:16], 4)
    prefill_ms, tok_s, tokens = greedy(ids, args.new_tokens)
    growth = {str(c): greedy(prompt_ids(c, 400, seed=c), 17)[1] for c in contexts}
    return {"prefill_ms": prefill_ms, "decode_tok_s": tok_s, "tokens": tokens, "context_tok_s": growth,
            "peak_rss_mib": peak_rss_mib()}


def convert_gguf(hf_dir: Path, llama_src: Path, out_dir: Path) -> dict[str, Path]:
    """F32 / F16 / Q8_0 by llama.cpp's convert_hf_to_gguf.py, Q4_0 quantised from F16 by llama.cpp."""
    import llama_cpp

    files = {name: out_dir / f"decoder-{name}.gguf" for name in LLAMA}
    script = f"""
import sys
sys.path.insert(0, {str(llama_src / 'gguf-py')!r}); sys.path.insert(0, {str(llama_src)!r})
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
c.main()
"""
    for name, outtype in (("F32", "f32"), ("F16", "f16"), ("Q8_0", "q8_0")):
        if not files[name].exists():
            subprocess.run([sys.executable, "-c", script, str(hf_dir), "--outfile", str(files[name]),
                            "--outtype", outtype], check=True, capture_output=True, text=True)
    if not files["Q4_0"].exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_FTYPE_Q4_0
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(files["F16"]).encode(), str(files["Q4_0"]).encode(), params) != 0:
            raise RuntimeError("llama_model_quantize failed")
    return files


def build(workdir: Path, vocab: int, block_sizes: list[int]) -> tuple[dict[str, Path], Path]:
    """The packages (quantised ones once per block size; "int8-b128" for block 128) and the transformers
    decoder folder (reused when present)."""
    import torch

    from fundusrt.export import export_package
    from fundusrt.export.genai import GenaiDecoderOptions
    from fundusrt.models.layouts import native
    from fundusrt.models.loader import load
    from fundusrt.models.lvlm import LVLM
    from fundusrt.models.tokenizer import build_tokenizer

    checkpoint = workdir / "checkpoint"
    if not checkpoint.exists():
        torch.manual_seed(0)
        native.save(LVLM(mini_decoder_config(vocab), build_tokenizer()).eval(), checkpoint)
    names = [name if name.startswith("fp32") or block == 32 else f"{name}-b{block}"
             for name in FUNDUSRT for block in (block_sizes if name in ("int8", "int4") else [32])]
    packages = {name: workdir / f"pkg-{name}" for name in names}
    for name, path in packages.items():
        if not path.exists():
            start = time.perf_counter()
            precision, _, block = name.partition("-b")
            genai = None if name == "fp32-torch" else GenaiDecoderOptions(precision=precision,
                                                                          block_size=int(block or 32))
            export_package(checkpoint, path, max_seq_len=8192, genai_decoder=genai)
            print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)
    hf_dir = workdir / "hf-decoder"
    if not hf_dir.exists():
        from transformers import PreTrainedTokenizerFast

        model = load(checkpoint)
        model.language_model.save_pretrained(hf_dir)
        PreTrainedTokenizerFast(tokenizer_object=model.tokenizer).save_pretrained(hf_dir)
    return packages, hf_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp-src", type=Path, default=None,
                        help="llama.cpp source tree (vendor/llama.cpp of the llama-cpp-python sdist); "
                             "without it llama.cpp is not measured")
    parser.add_argument("--workdir", type=Path, default=None, help="keep checkpoint, packages and GGUFs here")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=300, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--contexts", default="256,1024,4096", help="context lengths for decode tok/s growth")
    parser.add_argument("--vocab-size", type=int, default=151674)
    parser.add_argument("--only", default=None, help="comma-separated engines to run (default: all)")
    parser.add_argument("--block-sizes", default="32", help="quantisation blocks of the int8/int4 packages (32,128)")
    parser.add_argument("--worker", choices=["fundusrt", "llama"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",") if c]
    if args.worker:
        from fundusrt.models.tokenizer import build_tokenizer

        ids = prompt_ids(args.prompt, build_tokenizer().get_vocab_size())
        work = worker_fundusrt if args.worker == "fundusrt" else worker_llama
        print(json.dumps(work(args.path, ids, contexts, args)))
        return 0

    from fundusrt.bench.machine import cpu_summary, decode_bytes_per_token, host_bandwidth

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fundusrt-bench-decoder-"))
    packages, hf_dir = build(workdir, args.vocab_size, [int(b) for b in args.block_sizes.split(",")])
    engines: dict[str, tuple[str, Path]] = {f"fundusrt {n}": ("fundusrt", p) for n, p in packages.items()}
    weight_bytes = {f"fundusrt {n}": decode_bytes_per_token(p, 0)["weight_bytes"] for n, p in packages.items()}
    if args.llama_cpp_src is not None:
        if importlib.util.find_spec("llama_cpp") is None:
            raise SystemExit("llama-cpp-python is not installed: pip install llama-cpp-python")
        for name, path in convert_gguf(hf_dir, args.llama_cpp_src, workdir).items():
            engines[f"llama.cpp {name}"] = ("llama", path)
            weight_bytes[f"llama.cpp {name}"] = float(path.stat().st_size)
    wanted = set(args.only.split(",")) if args.only else None
    results = {}
    for name, (kind, path) in engines.items():
        if wanted and name.split(" ", 1)[1] not in wanted and name not in wanted:
            continue
        proc = subprocess.run([sys.executable, __file__, "--worker", kind, "--path", str(path),
                               "--threads", str(args.threads), "--prompt", str(args.prompt),
                               "--new-tokens", str(args.new_tokens), "--contexts", args.contexts],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name}: {results[name]['decode_tok_s']:.1f} tok/s", flush=True)

    bandwidth = host_bandwidth(threads=args.threads)
    print(f"\nCPU: {cpu_summary()}; {args.threads} threads; read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"prompt {args.prompt} tokens, {args.new_tokens} decoded, vocab {args.vocab_size}; workdir {workdir}")
    header = f"{'engine':22s}{'decode tok/s':>13s}{'prefill ms':>11s}{'weights MB':>11s}{'roofline':>9s}{'RSS MiB':>9s}"
    print(header + "".join(f"{'@' + str(c):>8s}" for c in contexts))
    for name, r in results.items():
        roofline = weight_bytes[name] * r["decode_tok_s"] / bandwidth
        print(f"{name:22s}{r['decode_tok_s']:13.1f}{r['prefill_ms']:11.0f}{weight_bytes[name] / 1e6:11.0f}"
              f"{roofline:9.0%}{r['peak_rss_mib']:9.0f}" + "".join(f"{r['context_tok_s'][str(c)]:8.1f}" for c in contexts))
    peers = {"int8": "llama.cpp Q8_0", "int4": "llama.cpp Q4_0", "fp32": "llama.cpp F32"}
    for ours in results:
        theirs = peers.get(ours.removeprefix("fundusrt ").split("-b")[0])
        if ours.startswith("fundusrt") and theirs in results:
            a, b = results[ours], results[theirs]
            print(f"{ours} vs {theirs}: decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x, "
                  f"prefill {b['prefill_ms'] / a['prefill_ms']:.2f}x")
    reference = results.get("fundusrt fp32-torch", {}).get("tokens")
    for name, r in results.items():
        if reference and name != "fundusrt fp32-torch":
            same = sum(x == y for x, y in zip(reference, r["tokens"]))
            print(f"greedy tokens of {name} equal to fundusrt fp32-torch: {same}/{len(reference)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Protocol scoring with the options of an item decoded together (batched decoder calls) against one fork per
option decoded a token at a time, on the same package in the same run.

    python benchmarks/bench_scoring.py --package PKG      # e.g. fundusrt export models/demo --out PKG --max-seq-len 512

The protocol is the shipped default with multi-token answers in place of its one-token ones ("Right eye",
"Yes, present", the DR grades spelled out), so that most options need decoder steps after the item prompt.
`Pipeline.score` runs on one synthetic fundus image both ways, alternating round by round: the decoder's
own `continuation_logits` (batched on ONNX Runtime) against `continuation_logits_by_forks` (the batch-1 path,
what scoring did before and what the TensorRT backend still does). Prints the medians of the whole call and
of the options' later tokens alone, the ratios, and the largest log-likelihood difference between the ways.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from bench_study import cpu_name

from fundusrt.runtime.backends.base import DecoderSession, continuation_logits_by_forks
from fundusrt.runtime.pipeline import ItemScore, load_package
from fundusrt.runtime.protocol import DEFAULT_PROTOCOL, Protocol, parse_protocol

LONGER_ANSWERS = {"Right": "Right eye", "Left": "Left eye", "Yes": "Yes, present", "No": "No, absent",
                  "A": "no apparent retinopathy", "B": "mild nonproliferative retinopathy",
                  "C": "moderate nonproliferative retinopathy", "D": "severe nonproliferative retinopathy",
                  "E": "proliferative retinopathy"}


def multi_token_protocol() -> Protocol:
    """The default protocol with every answer renamed by LONGER_ANSWERS (codes and rules unchanged)."""
    data = json.loads(DEFAULT_PROTOCOL.read_text())
    for item in data["items"]:
        for option in item["options"]:
            option["answer"] = LONGER_ANSWERS[option["answer"]]
        if "positive" in item:
            item["positive"] = [LONGER_ANSWERS[a] for a in item["positive"]]
    data["referral"]["positive"] = [LONGER_ANSWERS[a] for a in data["referral"]["positive"]]
    return parse_protocol(data)


class TimedDecoder:
    """A decoder session whose `continuation_logits` (its forks' too) is timed, and with `by_forks` run as one
    fork per continuation."""

    def __init__(self, inner: DecoderSession, by_forks: bool, spent: list[float]) -> None:
        self._inner, self._by_forks, self._spent = inner, by_forks, spent

    def __getattr__(self, name: str) -> Any:  # seq_len, max_seq_len, prefill, decode, reset
        return getattr(self._inner, name)

    def fork(self) -> TimedDecoder:
        return TimedDecoder(self._inner.fork(), self._by_forks, self._spent)

    def continuation_logits(self, continuations: Sequence[Sequence[int]]) -> list[np.ndarray]:
        start = time.perf_counter()
        logits = (continuation_logits_by_forks(self._inner, continuations) if self._by_forks
                  else self._inner.continuation_logits(continuations))
        self._spent.append(time.perf_counter() - start)
        return logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, required=True, help="model package")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every session (2)")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds of each way (20)")
    args = parser.parse_args()
    from fundusrt.synth.fundus import draw_fundus, random_case

    protocol = multi_token_protocol()
    pipe = load_package(args.package, threads=args.threads, protocol=protocol)
    image, _ = draw_fundus(random_case(0, 512, 512))
    spent: list[float] = []
    ways = {way: dataclasses.replace(pipe.sessions, decoder=TimedDecoder(pipe.sessions.decoder, way == "forks", spent))
            for way in ("forks", "batched")}
    totals: dict[str, list[float]] = {way: [] for way in ways}
    options: dict[str, list[float]] = {way: [] for way in ways}
    scores: dict[str, dict[str, ItemScore]] = {}
    for timed in (False, *[True] * args.rounds):  # one untimed warm-up round
        for way, sessions in ways.items():
            pipe.sessions = sessions
            spent.clear()
            start = time.perf_counter()
            scores[way] = pipe.score(image)
            if timed:
                totals[way].append(time.perf_counter() - start)
                options[way].append(sum(spent))
    lengths = {item.id: [len(pipe.tokenizer.encode(a, add_special_tokens=False).ids) for a in item.answers]
               for item in protocol.items}
    diff = max(abs(scores["batched"][i].log_likelihoods[a] - scores["forks"][i].log_likelihoods[a])
               for i in scores["forks"] for a in scores["forks"][i].log_likelihoods)
    print(f"{pipe.manifest.name} ({args.package}, decoder {pipe.manifest.precision}, KV cache "
          f"{pipe.manifest.decoder.kv_cache}); {cpu_name()}, {os.cpu_count()} logical CPUs, {args.threads} intra-op "
          f"threads; option tokens per item {lengths}; medians of {args.rounds} rounds")
    for what, times in (("Pipeline.score", totals), ("options' later tokens", options)):
        forks, batched = statistics.median(times["forks"]), statistics.median(times["batched"])
        print(f"{what}: one fork per option {forks * 1000:.1f} ms, batched {batched * 1000:.1f} ms: "
              f"{forks / batched:.2f}x")
    print(f"largest log-likelihood difference between the two ways: {diff:.3g}")


if __name__ == "__main__":
    main()

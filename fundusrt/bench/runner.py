"""`run_bench`: every package x backend (plus the transformers baseline) on every evaluation set.

Each configuration runs in its own worker process (`fundusrt.bench.worker`) with the same
settings and thread count, one after the other, so that its peak RSS is its own and runs do not
compete for cores. A backend that cannot run here is reported with the reason, not skipped
silently. Derived figures, computed here from the workers' measurements:

- ratios to the baseline (same evaluation set): e2e speed-up = baseline p50 / p50, TTFT speed-up,
  decode tok/s ratio = tok/s / baseline tok/s;
- which sets a package runs: MCQ sets only for packages that declare the MCQ prompt they were
  trained on (`manifest.extra["mcq_prompt"]`, see `fundusrt.manifest`); for the others an MCQ set is
  recorded as skipped with the reason, since a model never taught the prompt scores near zero on it
  and that figure says nothing about the package (its protocol items are scored by --screening);
- roofline: decode efficiency = bytes per token x tok/s / memory bandwidth, where bytes per token
  is every decoder weight plus the KV cache at the mean decoding length
  (`fundusrt.bench.machine.decode_bytes_per_token`), and the bandwidth is the host's for CPU
  backends and the GPU's for CUDA ones.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fundusrt.bench import machine
from fundusrt.bench.baseline import BASELINE_NAME
from fundusrt.bench.evalsets import read_eval_set, summarise
from fundusrt.bench.measure import MeasureSettings
from fundusrt.manifest import MCQ_PROMPT_KEY, MCQ_PROMPTS, Manifest
from fundusrt.runtime.backends.base import BackendError, unavailable_reason

GPU_BACKENDS = ("ort-cuda", "ort-trt")
WORKER_TIMEOUT_S = 3600


@dataclass
class BenchPlan:
    """What to run.

    Attributes:
        packages: model package directories.
        backends: backend names (see fundusrt.runtime.backends.base.BACKENDS).
        eval_sets: evaluation set paths (format told from the content).
        checkpoint: the checkpoint the packages were exported from, for the transformers baseline (None: none).
        settings: repeats, warm-up, items, answer length.
        threads: intra-op threads of every engine (None: each backend's default).
        baseline: run the transformers baseline (needs `checkpoint`).
        bandwidth_mib: buffer size of the host bandwidth measurement.
    """

    packages: list[Path]
    backends: list[str]
    eval_sets: list[Path]
    checkpoint: Path | None = None
    settings: MeasureSettings = dataclasses.field(default_factory=MeasureSettings)
    threads: int | None = None
    baseline: bool = True
    bandwidth_mib: int = 256


def _backend_reason(name: str) -> str | None:
    try:
        return unavailable_reason(name)
    except BackendError as exc:  # unknown names ("tensorrt", "torch") are reported like missing ones
        return str(exc)


def _set_names(paths: Sequence[Path]) -> list[str]:
    names: list[str] = []
    for path in paths:
        stem = path.stem if path.is_file() else path.name
        # Instruction files share a name (instructions.json): use their folder.
        base = path.parent.name if stem in names or stem == "instructions" else stem
        name, n = base, 2
        while name in names:
            name, n = f"{base}-{n}", n + 1
        names.append(name)
    return names


def skip_reason(manifest: Manifest, kind: str) -> str | None:
    """Why a package does not run an evaluation set of this kind (None: it runs it)."""
    if kind != "mcq":
        return None
    declared = manifest.extra.get(MCQ_PROMPT_KEY)
    if declared in MCQ_PROMPTS:
        return None
    said = "does not declare" if declared is None else f"declares an unknown MCQ prompt {declared!r} instead of"
    return (f"package {manifest.name!r} {said} the VLMEvalKit multiple-choice prompt it was trained on "
            f"(manifest extra {MCQ_PROMPT_KEY!r}: {MCQ_PROMPTS[0]!r}; `fundusrt export --answers-mcq`); "
            "its protocol items are scored by --screening instead")


def _run_worker(spec: dict[str, Any], scratch: Path, label: str) -> dict[str, Any]:
    spec_path, out_path = scratch / f"{label}.spec.json", scratch / f"{label}.result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "fundusrt.bench.worker", str(spec_path), str(out_path)],
                          capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False)
    if not out_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"worker exited with status {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(out_path.read_text(encoding="utf-8"))


def _roofline(result: dict[str, Any], package: Path, bandwidth: float | None, settings: MeasureSettings) -> None:
    """Add bytes per token and decode efficiency to each set's latency (in place)."""
    for data in result.get("sets", {}).values():
        if "latency" not in data:
            continue
        stages = data["latency"]["stages"]
        context = stages.get("prompt_tokens", 0.0) + settings.max_new_tokens / 2
        traffic = machine.decode_bytes_per_token(package, context)
        achieved = traffic["bytes_per_token"] * stages["decode_tok_s"]
        data["roofline"] = {**traffic, "context_len": context, "achieved_bytes_per_s": achieved,
                            "bandwidth_bytes_per_s": bandwidth,
                            "efficiency": achieved / bandwidth if bandwidth else None}


def _ratios(result: dict[str, Any], baseline: dict[str, Any] | None) -> None:
    """Add speed ratios to the baseline for each set both measured (in place)."""
    if not baseline or "sets" not in baseline:
        return
    for name, data in result.get("sets", {}).items():
        base = baseline["sets"].get(name, {})
        if "latency" not in data or "latency" not in base:
            continue
        mine, theirs = data["latency"], base["latency"]

        def ratio(num: float, den: float) -> float | None:
            return num / den if den > 0 else None

        data["vs_baseline"] = {
            "e2e_speedup": ratio(theirs["e2e_ms"]["p50"], mine["e2e_ms"]["p50"]),
            "ttft_speedup": ratio(theirs["stages"]["ttft_ms"], mine["stages"]["ttft_ms"]),
            "vision_speedup": ratio(theirs["stages"]["vision_ms"], mine["stages"]["vision_ms"]),
            "decode_tok_s_ratio": ratio(mine["stages"]["decode_tok_s"], theirs["stages"]["decode_tok_s"]),
        }


def run_bench(plan: BenchPlan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the plan and return the bench document (see fundusrt.bench.output for how it is written).

    Raises:
        EvalSetError: an evaluation set cannot be read at all (checked before anything runs).
        PackageError: a package's manifest cannot be read.
    """
    if not plan.packages:
        raise ValueError("no package to bench; pass --package (or --quick to build the demo package)")
    started = time.time()
    names = _set_names(plan.eval_sets)
    sets = [summarise(read_eval_set(path, name)) for path, name in zip(plan.eval_sets, names, strict=True)]
    identities = [machine.package_identity(package) for package in plan.packages]  # fail before measuring
    for summary in sets:
        for issue in summary["issues"][:5]:
            log(f"eval set {summary['name']}: skipped {issue}")
    log(f"measuring host read bandwidth ({plan.bandwidth_mib} MiB reductions)")
    host_bw = machine.host_bandwidth(plan.bandwidth_mib)
    wants_gpu = any(b in GPU_BACKENDS and _backend_reason(b) is None for b in plan.backends)
    gpu_bw, gpu_how = machine.gpu_bandwidth() if wants_gpu else (None, "not measured: no GPU backend in this run")
    skips = [{summary["name"]: reason for summary in sets
              if (reason := skip_reason(Manifest.load(package), summary["kind"])) is not None}
             for package in plan.packages]
    for identity, skipped in zip(identities, skips, strict=True):
        for name, reason in skipped.items():
            log(f"{identity['name']}: eval set {name} skipped: {reason}")

    def spec_sets(p_index: int) -> dict[str, Any]:
        """The worker spec's sets for a package: those it runs (the skipped are added to its result)."""
        return {"threads": plan.threads, "eval_sets": [[str(p), n] for p, n in zip(plan.eval_sets, names, strict=True)
                                                       if n not in skips[p_index]]}

    def with_skipped(result: dict[str, Any], p_index: int) -> dict[str, Any]:
        if "sets" in result:
            result["sets"].update({n: {"skipped": reason} for n, reason in skips[p_index].items()})
        return result
    configs: list[dict[str, Any]] = []
    baseline: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fundusrt-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        if plan.baseline and plan.checkpoint is None:
            baseline = {"backend": BASELINE_NAME, "error": "not run: it needs the checkpoint the package was "
                        "exported from (--checkpoint)"}
        elif plan.baseline and plan.checkpoint is not None:
            log(f"baseline: {BASELINE_NAME} on {plan.checkpoint}")
            # the baseline runs the checkpoint of the first package, so it skips what that package skips
            spec = {**spec_sets(0), "engine": "baseline", "checkpoint": str(plan.checkpoint),
                    "package": str(plan.packages[0]), "settings": dataclasses.asdict(plan.settings)}
            baseline = {"backend": BASELINE_NAME, "checkpoint": str(plan.checkpoint),
                        **with_skipped(_run_worker(spec, scratch, "baseline"), 0)}
            if "sets" in baseline:
                _roofline(baseline, plan.packages[0], host_bw, plan.settings)
        for p_index, (package, identity) in enumerate(zip(plan.packages, identities, strict=True)):
            for backend in plan.backends:
                entry: dict[str, Any] = {"package": identity, "backend": backend}
                reason = _backend_reason(backend)
                if reason is not None:
                    log(f"{identity['name']} on {backend}: unavailable ({reason})")
                    configs.append({**entry, "status": "unavailable", "reason": reason})
                    continue
                log(f"{identity['name']} ({identity['precision']}) on {backend}")
                settings = dataclasses.replace(plan.settings, sample_gpu_memory=backend in GPU_BACKENDS)
                spec = {**spec_sets(p_index), "engine": "package", "package": str(package), "backend": backend,
                        "settings": dataclasses.asdict(settings)}
                result = with_skipped(_run_worker(spec, scratch, f"p{p_index}-{backend}"), p_index)
                if "error" in result:
                    configs.append({**entry, "status": "error", **result})
                    continue
                _roofline(result, package, gpu_bw if backend in GPU_BACKENDS else host_bw, plan.settings)
                _ratios(result, baseline)
                configs.append({**entry, "status": "ok", **result})
    return {
        "format": "fundusrt-bench/1",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "hardware": machine.hardware(),
        "versions": machine.versions(),
        "memory_bandwidth": {"host_bytes_per_s": host_bw, "host_method": f"numpy copy of {plan.bandwidth_mib} MiB",
                             "gpu_bytes_per_s": gpu_bw, "gpu_method": gpu_how},
        "settings": {**dataclasses.asdict(plan.settings), "threads": plan.threads},
        "eval_sets": sets,
        "baseline": baseline,
        "configs": configs,
    }

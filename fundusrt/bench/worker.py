"""One bench configuration in its own process, so that its peak RSS is its own.

    python -m fundusrt.bench.worker SPEC.json RESULT.json

SPEC: {"engine": "package" | "baseline", "package": dir, "backend": name, "checkpoint": dir,
"threads": int | null, "eval_sets": [[path, name], ...], "settings": MeasureSettings fields}.
RESULT: {"info", "load_ms", "peak_rss_mib", "peak_gpu_memory_mib", "sets": {name: {"latency",
"accuracy"} or {"error"}}}, written atomically; a set that fails records its error and the
others still run.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from fundusrt.bench.evalsets import EvalSetError, read_eval_set
from fundusrt.bench.machine import peak_rss_mib
from fundusrt.bench.measure import Engine, MeasureSettings, measure_accuracy, measure_latency
from fundusrt.config import GenerationConfig
from fundusrt.manifest import Manifest, atomic_write_text


def open_engine(spec: dict[str, Any]) -> tuple[Engine, dict[str, Any]]:
    """The engine a spec names, and its identity."""
    if spec["engine"] == "baseline":
        from fundusrt.bench.baseline import TransformersBaseline

        tiling = Manifest.load(spec["package"]).preprocessing if spec.get("package") else None
        baseline = TransformersBaseline(spec["checkpoint"], threads=spec.get("threads"), tiling=tiling)
        return baseline, baseline.info()
    from fundusrt.runtime.pipeline import load_package

    pipeline = load_package(spec["package"], backend=spec["backend"], threads=spec.get("threads"))
    return pipeline, pipeline.package_info()


def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Open the engine and measure every evaluation set of the spec."""
    settings = MeasureSettings(**spec["settings"])
    gen = GenerationConfig(max_new_tokens=settings.max_new_tokens)
    start = time.perf_counter()
    engine, info = open_engine(spec)
    result: dict[str, Any] = {"info": info, "load_ms": (time.perf_counter() - start) * 1000.0, "sets": {}}
    for path, name in spec["eval_sets"]:
        try:
            eval_set = read_eval_set(path, name)
            if not eval_set.items:
                raise EvalSetError(f"{path} has no usable item")
            latency = measure_latency(engine, eval_set, settings, gen)
            result["sets"][name] = {"latency": latency, "accuracy": measure_accuracy(engine, eval_set, settings, gen)}
        except (ValueError, OSError, RuntimeError) as exc:  # one set failing must not sink the others
            result["sets"][name] = {"error": f"{type(exc).__name__}: {exc}"}
    gpu = [s["latency"]["peak_gpu_memory_mib"] for s in result["sets"].values()
           if "latency" in s and s["latency"]["peak_gpu_memory_mib"] is not None]
    result["peak_gpu_memory_mib"] = max(gpu) if gpu else None
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main(argv: list[str] | None = None) -> int:
    """Run SPEC, write RESULT; on a failure to even open the engine, RESULT holds the error."""
    spec_path, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    try:
        result = run_spec(spec)
    except Exception as exc:  # reported in the bench output, not as a crash of the whole bench
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=5)}
    atomic_write_text(Path(out_path), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

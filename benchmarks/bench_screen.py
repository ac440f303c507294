"""Studies/hour of `fundusrt screen` in this process against Ray Data with 1 and 2 actors, on the same studies
and package in the same run; memory per actor and the start-up cost of an actor.

    fundusrt export models/demo --out /tmp/demo-pkg
    python benchmarks/bench_screen.py --package /tmp/demo-pkg --studies 16

The studies are drawn by `fundusrt.synth` (both eyes, camera-sized Ophthalmic Photography in the synth's
transfer syntaxes, so reading and decoding cost what they cost on camera files). Each configuration
screens all of them into its own output folder with `fundusrt.scale.screen`, exactly as the command
does, in the order in-process, Ray 1 actor, Ray 2 actors, in-process again (the first run also pays for
cold caches and first imports); a local Ray cluster is started once, before the Ray runs, and its start
is reported apart. In this process the package uses every core; each Ray actor reserves one CPU and
runs one thread. The
actors' resident memory is sampled every 0.2 s (psutil); start-up is the package load each actor reports
in its rows and the time from the run's start to its first recorded study.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pyarrow.parquet as pq

from fundusrt.scale import RayOptions, ScreenSettings, open_source, screen
from fundusrt.synth import write_study


class RssSampler:
    """Peak resident memory (MiB) of the processes whose command line holds `marker`, sampled in a thread."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.peak: dict[int, float] = {}
        # actors of an earlier run still shutting down are not this run's
        self._earlier = {p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                try:
                    if proc.pid not in self._earlier and self.marker in " ".join(proc.info["cmdline"] or []):
                        rss = proc.memory_info().rss / 2**20
                        self.peak[proc.pid] = max(self.peak.get(proc.pid, 0.0), rss)
                except psutil.Error:
                    continue
            self._stop.wait(0.2)


def first_result_seconds(out: Path, started: float) -> float:
    """Seconds from the run's start (epoch) to its first recorded study."""
    times = pq.read_table(out / "results.parquet", columns=["completed_at"]).column("completed_at").to_pylist()
    return min(t.timestamp() for t in times) - started


def run_one(name: str, archive: Path, settings: ScreenSettings, ray: RayOptions | None) -> dict[str, Any]:
    shutil.rmtree(settings.out_dir, ignore_errors=True)  # a fresh run, not a resumed one
    started = time.time()
    with RssSampler("MapBatches(StudyScreener)") as actors:
        summary = screen(open_source(str(archive), Path(settings.out_dir) / ".index.sqlite"), settings,
                         batch_size=2, ray=ray)
    table = pq.read_table(Path(settings.out_dir) / "results.parquet", columns=["worker", "load_seconds"])
    loads = dict(zip(table.column("worker").to_pylist(), table.column("load_seconds").to_pylist(), strict=True))
    run = summary["this_run"]
    result = {"name": name, "studies": run["studies"], "failed": run["failed"], "wall_s": run["wall_seconds"],
              "studies_per_hour": run["studies_per_hour"], "first_result_s": first_result_seconds(
                  Path(settings.out_dir), started),
              "package_load_s": sorted(round(v, 2) for v in loads.values()),
              "actor_peak_rss_mib": sorted(round(v) for v in actors.peak.values())}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", required=True, type=Path)
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-screen-"))
    archive = work / "archive"
    start = time.perf_counter()
    for seed in range(args.studies):
        if not (archive / f"study-{seed:03d}").is_dir():
            write_study(archive / f"study-{seed:03d}", seed=1000 + seed, variants=("op",))
    for truth in archive.glob("*/ground_truth.json"):
        truth.unlink()  # not DICOM: the screen would report each as a failed item
    print(f"archive: {args.studies} studies, {sum(1 for _ in archive.rglob('*.dcm'))} files "
          f"({time.perf_counter() - start:.1f} s to draw)")
    cores = len(os.sched_getaffinity(0))
    print(f"machine: {platform.processor() or platform.machine()}, {cores} usable cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB; load average {os.getloadavg()[0]:.1f}")

    def settings(name: str, threads: int | None) -> ScreenSettings:
        return ScreenSettings(package=str(args.package), out_dir=str(work / name),
                              max_new_tokens=args.max_new_tokens, threads=threads)

    results = [run_one("in-process", archive, settings("in-process", None), None)]
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    print(f"ray.init (local cluster of {cores} CPUs): {time.perf_counter() - start:.1f} s")
    for workers in (1, 2):
        results.append(run_one(f"ray-{workers}-actor", archive, settings(f"ray-{workers}", 1),
                               RayOptions(workers=workers, cpus_per_worker=1)))
    ray.shutdown()
    # in this process again: the first run also paid for cold file caches and first imports
    results.append(run_one("in-process 2nd", archive, settings("in-process-2", None), None))
    print(f"\n{'engine':<16}{'studies/h':>10}{'wall s':>9}{'1st study s':>13}{'load s':>14}  actor peak RSS MiB")
    for r in results:
        print(f"{r['name']:<16}{r['studies_per_hour']:>10.0f}{r['wall_s']:>9.1f}{r['first_result_s']:>13.1f}"
              f"{str(r['package_load_s']):>14}  {r['actor_peak_rss_mib'] or '-'}")


if __name__ == "__main__":
    main()

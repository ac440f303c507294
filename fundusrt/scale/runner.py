"""Run a screening: the studies of a source, minus those already done, through workers into the results table.

Two engines, the same worker (`StudyScreener`) and the same table:
- in this process (the default): one loaded package, batches in turn;
- Ray Data (`ray=`): the pending studies as a dataset, `map_batches` over an actor pool, one loaded
  package per actor with its CPU threads or GPU share as Ray resources. A batch whose actor dies is
  retried on a restarted actor by Ray (actor restarts and task retries); the studies of a batch that
  kept killing its actor get a failed row each.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from fundusrt._deps import require
from fundusrt.manifest import atomic_write_text
from fundusrt.scale.sources import StudyRef
from fundusrt.scale.table import ResultsTable, failed_row, summarise, to_arrow
from fundusrt.scale.worker import ScreenSettings, StudyScreener

SUMMARY_NAME = "summary.json"
PLAN_DIR = ".plan"
_PLAN_CHUNK = 1000  # study references per plan file (the Ray dataset's input)
# A batch whose actor died is run again on a restarted actor up to this many times, then its studies fail.
MAX_BATCH_RETRIES = 3


@dataclass
class RayOptions:
    """How to run on Ray.

    Attributes:
        address: "auto" (the running cluster, else a new local one) or a cluster address.
        workers: actors, each holding one loaded package.
        cpus_per_worker: CPUs Ray reserves per actor (also the package's intra-op threads).
        gpus_per_worker: GPU share per actor (0: none; 0.5: two actors per GPU).
    """

    address: str = "auto"
    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0


@dataclass
class Progress:
    """Studies done / failed, rate and ETA on the terminal, at most once a second, and a final line."""

    total: int
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    done: int = 0
    failed: int = 0
    start: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def update(self, statuses: Iterable[tuple[str, str]]) -> None:
        """Count the (study key, status) pairs of a recorded batch (one pair per study)."""
        for _, status in statuses:
            self.done += status == "done"
            self.failed += status != "done"
        now = time.monotonic()
        if now - self._last >= 1.0 or self.done + self.failed == self.total:
            self._last = now
            finished = self.done + self.failed
            rate = finished / max(now - self.start, 1e-9)
            eta = (self.total - finished) / rate if rate > 0 else float("inf")
            self.stream.write(f"screen: {finished}/{self.total} studies ({self.failed} failed), "
                              f"{rate * 3600:.0f} studies/h, ETA {_clock(eta)}\n")
            self.stream.flush()

    def studies_per_hour(self) -> float:
        """The rate over the run so far."""
        return (self.done + self.failed) * 3600 / max(time.monotonic() - self.start, 1e-9)


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _study_statuses(table: Any) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for key, status in zip(table.column("study_key").to_pylist(), table.column("status").to_pylist(), strict=True):
        seen.setdefault(key, status)
    return list(seen.items())


def screen(refs: Iterable[StudyRef], settings: ScreenSettings, *, resume: bool = False, batch_size: int = 4,
           ray: RayOptions | None = None, progress_stream: TextIO | None = None) -> dict[str, Any]:
    """Screen every study of `refs` not already done in `settings.out_dir`; returns the run summary.

    Args:
        refs: the studies (see `fundusrt.scale.sources.open_source`).
        settings: package, protocol, output folder and what to write.
        resume: continue the table in `out_dir` (studies done are skipped, failed ones run again);
            without it, an existing table is an error.
        batch_size: studies per worker call.
        ray: run on Ray Data with these options; None: in this process.
        progress_stream: where progress lines go (default stderr).

    Raises:
        FileExistsError: `out_dir` holds results and `resume` is False.
    """
    out_dir = Path(settings.out_dir)
    table = ResultsTable(out_dir)
    if table.exists() and not resume:
        raise FileExistsError(f"{out_dir} already holds the results of a run: add --resume to continue it, "
                              "or choose another --out")
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = table.completed() if resume else set()
    start = time.monotonic()
    pending = (ref for ref in refs if ref.key not in done)
    if ray is None:
        progress, workers = _run_here(pending, settings, table, batch_size, progress_stream)
    else:
        progress, workers = _run_on_ray(pending, settings, table, batch_size, ray, progress_stream)
    wall = time.monotonic() - start
    # Folders a worker was writing when it died; every worker has stopped by now.
    for stale in (out_dir / "studies").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    result = table.compact()
    summary = summarise(result, [
        ("this_run", {"studies": progress.done + progress.failed, "failed": progress.failed,
                      "skipped_as_done": len(done), "wall_seconds": round(wall, 3),
                      "studies_per_hour": round(progress.studies_per_hour(), 1), "workers": workers,
                      "engine": "ray" if ray is not None else "in-process",
                      **({"ray": asdict(ray)} if ray is not None else {})}),
        ("settings", asdict(settings)),
    ])
    atomic_write_text(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def _batches(refs: Iterable[StudyRef], size: int) -> Iterator[list[StudyRef]]:
    batch: list[StudyRef] = []
    for ref in refs:
        batch.append(ref)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_here(pending: Iterable[StudyRef], settings: ScreenSettings, table: ResultsTable, batch_size: int,
              stream: TextIO | None) -> tuple[Progress, int]:
    # The source is listed first (it is bounded on disk, not in memory) so that progress knows the total.
    plan = _write_plan(pending, Path(settings.out_dir) / PLAN_DIR)
    progress = Progress(plan.total, **({"stream": stream} if stream else {}))
    screener = StudyScreener(settings) if plan.total else None
    for batch in _batches(plan.refs(), batch_size):
        rows = to_arrow([row for ref in batch for row in screener.screen(ref)])
        table.append(rows)
        progress.update(_study_statuses(rows))
    plan.remove()
    return progress, 1


@dataclass
class _Plan:
    """The pending study references, as Parquet files of `_PLAN_CHUNK` rows, on disk until the run starts."""

    folder: Path
    total: int

    def refs(self) -> Iterator[StudyRef]:
        for table in self.tables():
            yield from map(StudyRef.from_row, table.to_pylist())

    def tables(self) -> list[Any]:
        pq = require("pyarrow.parquet")
        return [pq.read_table(path) for path in sorted(self.folder.glob("*.parquet"))]

    def remove(self) -> None:
        for path in self.folder.glob("*"):
            path.unlink()
        self.folder.rmdir()


def _write_plan(pending: Iterable[StudyRef], folder: Path) -> _Plan:
    pa = require("pyarrow", "`fundusrt screen`")
    pq = require("pyarrow.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*"):
        old.unlink()
    plan_schema = pa.schema([("key", pa.string()), ("source", pa.string()), ("files", pa.list_(pa.string())),
                             ("url", pa.string()), ("problem", pa.string())])
    total = 0
    for number, chunk in enumerate(_batches(pending, _PLAN_CHUNK)):
        pq.write_table(pa.Table.from_pylist([r.to_row() for r in chunk], schema=plan_schema),
                       folder / f"plan-{number:06d}.parquet")
        total += len(chunk)
    return _Plan(folder, total)


def _run_on_ray(pending: Iterable[StudyRef], settings: ScreenSettings, table: ResultsTable, batch_size: int,
                options: RayOptions, stream: TextIO | None) -> tuple[Progress, int]:
    ray = require("ray", "`fundusrt screen --ray`")
    require("ray.data", "`fundusrt screen --ray`")
    if not ray.is_initialized():
        ray.init(address=None if options.address == "auto" else options.address, include_dashboard=False,
                 log_to_driver=False)
    plan = _write_plan(pending, Path(settings.out_dir) / PLAN_DIR)
    progress = Progress(plan.total, **({"stream": stream} if stream else {}))
    if plan.total == 0:
        plan.remove()
        return progress, 0
    context = ray.data.DataContext.get_current()
    # A batch that still kills its actor after MAX_BATCH_RETRIES is dropped, not the run: its studies get
    # failed rows below and run again with --resume.
    context.max_errored_blocks = -1
    workers = max(1, min(options.workers, plan.total))
    threads = max(1, int(options.cpus_per_worker))
    # The plan goes in as blocks from the driver (references only, a few hundred bytes a study), not as
    # read tasks: with every CPU held by an actor, a read task that needs one would never be scheduled.
    # One block per batch, so that the batches spread over the actors (a block goes to one actor).
    blocks = [t.slice(i, batch_size) for t in plan.tables() for i in range(0, t.num_rows, batch_size)]
    with warnings.catch_warnings():
        # max_restarts / max_task_retries have no named parameter before Ray 2.64 (see pyproject's scale extra)
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        dataset = ray.data.from_arrow(blocks).map_batches(
            StudyScreener, fn_constructor_kwargs={"settings": _with_threads(settings, threads)},
            batch_size=batch_size, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=options.cpus_per_worker, num_gpus=options.gpus_per_worker or None,
            max_restarts=-1, max_task_retries=MAX_BATCH_RETRIES,
        )
    recorded: set[str] = set()
    for rows in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        table.append(rows)
        statuses = _study_statuses(rows)
        recorded.update(key for key, _ in statuses)
        progress.update(statuses)
    lost = [ref for ref in plan.refs() if ref.key not in recorded]
    if lost:
        reason = (f"not screened: the worker screening its batch died {MAX_BATCH_RETRIES + 1} times "
                  "(see the Ray logs); --resume runs it again")
        rows = to_arrow([failed_row(ref, reason, _lost_meta()) for ref in lost])
        table.append(rows)
        progress.update(_study_statuses(rows))
    plan.remove()
    return progress, workers


def _lost_meta() -> dict[str, Any]:
    return {"attempt_id": uuid.uuid4().hex, "completed_at": datetime.now(timezone.utc)}


def _with_threads(settings: ScreenSettings, threads: int) -> ScreenSettings:
    return settings if settings.threads is not None else replace(settings, threads=threads)


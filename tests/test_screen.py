"""`fundusrt screen`: an archive through a local Ray cluster and in this process, on a real tiny package.

The archive is 60 synthetic studies: a few drawn by `fundusrt.synth`, each copied under new Study, Series
and SOP Instance UIDs (same pixels, so a copy's findings equal its original's). Ray runs on a local
cluster of 2 CPUs; one actor is killed by its process id while the run goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from fundusrt.config import GenerationConfig
from fundusrt.synth import write_study

pa = pytest.importorskip("pyarrow", reason="pyarrow is in the scale extra: pip install 'fundusrt[scale]'")
pq = pytest.importorskip("pyarrow.parquet")

from fundusrt.scale import RayOptions, ScreenSettings, open_source, screen  # noqa: E402
from fundusrt.scale.table import ResultsTable  # noqa: E402

MAX_NEW_TOKENS = 6
BASES = 6  # studies drawn; the rest of the archive are copies of these
RAY_STUDIES = 60  # the figure; about a minute on 2 CPUs


@pytest.fixture(scope="module")
def package(tiny_package) -> Path:
    return tiny_package("internvit-shuffle", seed=1)[1]


def write_archive(root: Path, studies: int, bases: int = BASES) -> dict[str, list[Path]]:
    """`studies` studies under root/study-NN/, copies of `bases` drawn ones; returns {study uid: base files}."""
    drawn = [write_study(root.parent / f"{root.name}-drawn" / f"base-{b}", seed=b, variants=("op",),
                         transfer_syntaxes=("explicit-le",), size=(256, 256)) for b in range(bases)]
    origin = {}
    for number in range(studies):
        base = drawn[number % bases]
        study_uid = generate_uid(entropy_srcs=[str(root), str(number), "study"])
        series = {}
        folder = root / f"study-{number:02d}"
        folder.mkdir(parents=True)
        for path in base.files:
            ds = pydicom.dcmread(path)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series.setdefault(ds.SeriesInstanceUID, generate_uid())
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / path.name, enforce_file_format=True)
        origin[study_uid] = sorted(base.files)
    return origin


def reference_eyes(package: Path, origin: dict[str, list[Path]]) -> dict[str, dict[str, Any]]:
    """{study uid: {eye: (decision, referral probability, {item: answer})}} from the runtime's own API."""
    from fundusrt.runtime.pipeline import load_package

    pipeline = load_package(package, threads=1)
    by_base: dict[tuple[Path, ...], dict[str, Any]] = {}
    expected = {}
    for uid, files in origin.items():
        if tuple(files) not in by_base:
            report = pipeline.run_study(files, gen=GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)).to_dict()
            by_base[tuple(files)] = {eye: (e["decision"], e["referral_probability"],
                                           {k: v["answer"] for k, v in e["items"].items()})
                                     for eye, e in report["eyes"].items()}
        expected[uid] = by_base[tuple(files)]
    return expected


def table_eyes(table: Any) -> dict[str, dict[str, Any]]:
    got: dict[str, dict[str, Any]] = {}
    for row in table.to_pylist():
        got.setdefault(row["study_key"], {})[row["eye"]] = (
            row["eye_decision"], row["eye_referral_probability"], {i["item"]: i["answer"] for i in row["items"]})
    return got


def assert_same_findings(got: dict[str, dict[str, Any]], expected: dict[str, dict[str, Any]]) -> None:
    assert got.keys() == expected.keys()
    for uid, eyes in expected.items():
        assert got[uid].keys() == eyes.keys(), uid
        for eye, (decision, probability, items) in eyes.items():
            g_decision, g_probability, g_items = got[uid][eye]
            assert (g_decision, g_items) == (decision, items), (uid, eye)
            # threads per session may differ between the runs: float sums in another order
            assert g_probability == pytest.approx(probability, rel=1e-5, abs=1e-9), (uid, eye)


def settings(package: Path, out: Path, **kwargs: Any) -> ScreenSettings:
    return ScreenSettings(package=str(package), out_dir=str(out), max_new_tokens=MAX_NEW_TOKENS, threads=1, **kwargs)


def one_row_per_eye(table: Any) -> Counter:
    return Counter(zip(table.column("study_key").to_pylist(), table.column("eye").to_pylist(), strict=True))


# ---------------------------------------------------------------- Ray

@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="ray is in the scale extra: pip install 'fundusrt[scale]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def screener_actor_pids() -> list[int]:
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if "MapBatches(StudyScreener)" in " ".join(proc.info["cmdline"] or []):
            pids.append(proc.info["pid"])
    return pids


@pytest.mark.slow
def test_ray_screens_60_studies_exactly_once_with_an_actor_killed(package: Path, ray_cluster: Any,
                                                                   tmp_path: Path) -> None:
    origin = write_archive(tmp_path / "archive", RAY_STUDIES)
    out = tmp_path / "out"
    killed: dict[str, Any] = {}

    def kill_one_actor_mid_run() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = len(list((out / "studies").glob("1.*"))) if (out / "studies").is_dir() else 0
            pids = screener_actor_pids()
            if done >= 6 and pids:
                killed.update(pid=pids[0], studies_done=done, actors=set(pids))
                os.kill(pids[0], signal.SIGKILL)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor_mid_run, daemon=True)
    killer.start()
    summary = screen(open_source(str(tmp_path / "archive"), tmp_path / "index.sqlite"), settings(package, out),
                     batch_size=2, ray=RayOptions(workers=2))
    killer.join(timeout=5)
    assert "pid" in killed and killed["studies_done"] < RAY_STUDIES, f"no actor was killed mid-run: {killed}"

    table = pq.read_table(out / "results.parquet")
    counts = one_row_per_eye(table)
    assert set(counts.values()) == {1}, [k for k, n in counts.items() if n > 1]  # no study twice
    assert set(table.column("study_key").to_pylist()) == set(origin)  # none lost
    assert set(table.column("status").to_pylist()) == {"done"}
    assert summary["done"] == RAY_STUDIES and summary["failed"] == 0 and summary["this_run"]["engine"] == "ray"
    import psutil

    assert not psutil.pid_exists(killed["pid"])
    workers = {int(worker.rsplit(":", 1)[1]) for worker in table.column("worker").to_pylist()}
    assert workers - killed["actors"], "no restarted actor screened the rest"  # Ray restarted the killed one
    # every study's results folder holds one SR and its JSON report; nothing half-written is left
    folders = sorted((out / "studies").iterdir())
    assert [f.name for f in folders] == sorted(origin)
    for folder in folders:
        assert len(list(folder.glob("SR_*.dcm"))) == 1 and len(list(folder.glob("report_*.json"))) == 1, folder
    assert_same_findings(table_eyes(table), reference_eyes(package, origin))


# ---------------------------------------------------------------- in this process

def fundusrt_screen(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fundusrt.cli", "screen", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_resume_after_an_interrupted_run_screens_only_what_is_missing(package: Path, tmp_path: Path) -> None:
    origin = write_archive(tmp_path / "archive", 8, bases=2)
    folders = sorted((tmp_path / "archive").iterdir())
    (tmp_path / "list.csv").write_text("path\n" + "".join(f"archive/{f.name}\n" for f in folders))
    out = tmp_path / "out"
    common = ["--package", str(package), "--out", str(out), "--max-new-tokens", str(MAX_NEW_TOKENS),
              "--threads", "1", "--batch-size", "2"]
    first = fundusrt_screen(str(tmp_path / "list.csv"), *common)
    deadline = time.monotonic() + 120
    while len(list((out / "results.parts").glob("*.parquet"))) < 1 if (out / "results.parts").is_dir() else True:
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # no chance to tidy up: the parts are all that is left
    first.wait()
    done_before = ResultsTable(out).completed()
    assert 2 <= len(done_before) < 8

    with pytest.raises(FileExistsError, match="--resume"):  # a second run never overwrites the first silently
        screen([], settings(package, out))

    resumed = fundusrt_screen(str(tmp_path / "list.csv"), *common, "--resume")
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["skipped_as_done"] == len(done_before)
    assert summary["this_run"]["studies"] == 8 - len(done_before)
    assert "studies/hour" in stdout and "ETA" in stderr
    table = pq.read_table(out / "results.parquet")
    assert set(one_row_per_eye(table).values()) == {1}
    assert set(table.column("study_key").to_pylist()) == set(origin)
    assert not list((out / "results.parts").glob("*.parquet"))  # compacted into the table
    assert not [p for p in (out / "studies").iterdir() if p.name.startswith(".tmp-")]
    assert_same_findings(table_eyes(table), reference_eyes(package, origin))


def test_broken_files_non_fundus_series_and_an_empty_study_are_reported(package: Path, tmp_path: Path) -> None:
    origin = write_archive(tmp_path / "archive", 2, bases=1)
    archive = tmp_path / "archive"
    good_uid, other_uid = sorted(origin)
    good = next(d for d in archive.iterdir() if pydicom.dcmread(next(d.iterdir())).StudyInstanceUID == good_uid)
    source = next(good.iterdir())
    (archive / "broken").mkdir()
    (archive / "broken" / "noise.dcm").write_bytes(os.urandom(2000))
    # a fundus image cut inside its pixel data, alone in its study: the header groups it, decoding fails
    truncated = pydicom.dcmread(source)
    truncated.StudyInstanceUID = generate_uid()
    truncated.save_as(archive / "broken" / "truncated.dcm", enforce_file_format=True)
    data = (archive / "broken" / "truncated.dcm").read_bytes()
    (archive / "broken" / "truncated.dcm").write_bytes(data[: len(data) // 2])
    # a CT series in the good study and a study that holds a CT only: not fundus photographs
    ct = pydicom.dcmread(Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm")
    ct.StudyInstanceUID = good_uid
    ct.save_as(good / "ct.dcm", enforce_file_format=True)
    ct.StudyInstanceUID = ct_only = generate_uid()
    ct.SOPInstanceUID = generate_uid()
    (archive / "ct-study").mkdir()
    ct.save_as(archive / "ct-study" / "ct.dcm", enforce_file_format=True)
    (archive / "empty-study").mkdir()

    out = tmp_path / "out"
    summary = screen(open_source(str(archive), tmp_path / "index.sqlite"), settings(package, out, write_pdf=True))
    table = pq.read_table(out / "results.parquet")
    rows = {row["study_key"]: row for row in table.to_pylist()}
    assert set(one_row_per_eye(table).values()) == {1}
    assert summary["done"] == 2 and summary["failed"] == 4
    assert rows[f"file:{archive / 'broken' / 'noise.dcm'}"]["reason"] == "not a DICOM file"
    assert "no fundus image" in rows[truncated.StudyInstanceUID]["reason"]
    assert "truncated" in rows[truncated.StudyInstanceUID]["reason"].lower()
    assert "no fundus image" in rows[ct_only]["reason"] and "CT" in rows[ct_only]["reason"]
    assert rows[f"folder:{archive / 'empty-study'}"]["reason"] == "empty folder: no DICOM files"
    good_rows = table.filter(pa.compute.equal(table.column("study_key"), good_uid)).to_pylist()
    assert {r["eye"] for r in good_rows} == {"R", "L"} and {r["status"] for r in good_rows} == {"done"}
    assert any("ct.dcm" in f and "rejected" in f for f in good_rows[0]["files_not_used"])
    assert other_uid in rows and rows[other_uid]["status"] == "done"

    # The good study's results are what `fundusrt run --dicom-out` writes for it (the CT file left out alike).
    run_out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fundusrt.cli", "run", str(good), "--package", str(package),
                           "--max-new-tokens", str(MAX_NEW_TOKENS), "--threads", "1", "--dicom-out", str(run_out),
                           "--pdf"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    screened_dir = Path(good_rows[0]["results_dir"])
    assert screened_dir == out / "studies" / good_uid
    ran = json.loads(next(run_out.glob("report_*.json")).read_text())
    screened = json.loads(next(screened_dir.glob("report_*.json")).read_text())
    assert findings(screened) == findings(ran)
    kinds = Counter(p.name.split("_")[0] for p in run_out.iterdir())
    assert Counter(p.name.split("_")[0] for p in screened_dir.iterdir() if p.name != "screen.json") == kinds
    assert kinds["SR"] == 1 and kinds["PDF"] == 1 and kinds["report"] == 1


def findings(report: dict[str, Any]) -> Any:
    """A JSON report without its timings: what must not depend on how the study was run."""
    images = [{k: v for k, v in image.items() if k != "timings"} for image in report["images"]]
    for image in images:
        image["answers"] = [{k: v for k, v in a.items() if k != "timings"} for a in image["answers"]]
    return report["eyes"], report["screening"], images, report["errors"], report["package"]


@pytest.mark.slow
def test_screen_verb_with_ray_runs_on_a_local_cluster(package: Path, tmp_path: Path) -> None:
    """`fundusrt screen --ray` as a user types it: its own local cluster, the rows the runtime gives."""
    pytest.importorskip("ray", reason="ray is in the scale extra: pip install 'fundusrt[scale]'")
    origin = write_archive(tmp_path / "archive", 4, bases=2)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a new local cluster, not the tests' one
    proc = subprocess.run([sys.executable, "-m", "fundusrt.cli", "screen", str(tmp_path / "archive"), "--package",
                           str(package), "--out", str(out), "--ray", "--workers", "1", "--threads", "1",
                           "--max-new-tokens", str(MAX_NEW_TOKENS)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["this_run"]["engine"] == "ray" and summary["done"] == 4 and summary["failed"] == 0
    table = pq.read_table(out / "results.parquet")
    assert set(one_row_per_eye(table).values()) == {1}
    assert_same_findings(table_eyes(table), reference_eyes(package, origin))

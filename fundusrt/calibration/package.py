"""`calibrate_package`: an fp32 model package -> an accuracy-gated INT8 package.

The quantised package is assembled in a temporary sibling directory: every file of the fp32
package is copied, the vision, connector and decoder ONNX files are replaced by their quantised
versions (embed stays fp32: a Gather gains nothing from INT8), the manifest records how they were
quantised and the gate's figures, and only a package that passes the gate (or `force`) is renamed
into place. A failed gate leaves nothing at the destination.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from fundusrt.calibration.dataset import (
    QUANTISED_COMPONENTS,
    CalibrationError,
    CalibrationSet,
    SourceImage,
    calibration_key,
    iter_source_images,
    load_prompts,
    source_files,
)
from fundusrt.calibration.gate import GateReport, GateThresholds, evaluate_gate
from fundusrt.calibration.quantize import QuantOptions, quantize_qdq, quantize_weight_only
from fundusrt.calibration.record import record_calibration_set
from fundusrt.manifest import Manifest, publish_package, sha256_file
from fundusrt.runtime.pipeline import Pipeline, load_package

QUANTIZATION_KEY = "quantization"
GATE_KEY = "accuracy_gate"
# Held-out synthetic studies use seeds far from anything `fundusrt synth` writes by default.
HOLDOUT_SEED = 1_000_000
HOLDOUT_SIZE = (512, 384)


class GateFailedError(CalibrationError):
    """The quantised package failed the accuracy gate and was not written."""

    def __init__(self, report: GateReport) -> None:
        super().__init__("the INT8 package fails the accuracy gate (" + "; ".join(report.failures)
                         + "); nothing was written. Calibrate on more representative images, try another "
                         "--method or a weight-only --decoder mode, or pass --force to write it anyway")
        self.report = report


@dataclass(frozen=True)
class CalibrationSettings:
    """How the calibration set is recorded and the gate run.

    Attributes:
        max_images: calibration images used (the first ones found).
        prompts_per_image: prompts asked per calibration image.
        decode_steps: greedy decode steps recorded after each prefill.
        holdout_images: held-out images the gate uses (the first ones found).
        holdout_studies: synthetic held-out studies written when no held-out folder is given.
        gate_tokens: length of the fp32 reference answers for token agreement.
    """

    max_images: int = 32
    prompts_per_image: int = 2
    decode_steps: int = 4
    holdout_images: int = 8
    holdout_studies: int = 2
    gate_tokens: int = 32

    def __post_init__(self) -> None:
        for name, value in dataclasses.asdict(self).items():
            low = 0 if name == "decode_steps" else 1
            if value < low:
                raise CalibrationError(f"{name} must be >= {low}, got {value}")

    def recording(self) -> dict[str, int]:
        """The settings that change what is recorded (part of the cache key)."""
        return {"max_images": self.max_images, "prompts_per_image": self.prompts_per_image,
                "decode_steps": self.decode_steps}


@dataclass
class CalibrationResult:
    """What `calibrate_package` produced."""

    package_dir: Path
    gate: GateReport
    cache_dir: Path
    cache_hit: bool


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/fundusrt/calibration, else ~/.cache/fundusrt/calibration."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fundusrt" / "calibration"


def _decode_images(files: Sequence[Path], limit: int, what: str) -> list[SourceImage]:
    images: list[SourceImage] = []
    problems: list[str] = []
    for item in iter_source_images(files):
        if isinstance(item, SourceImage):
            images.append(item)
            if len(images) == limit:
                break
        else:
            problems.append(f"{item[0]}: {item[1]}")
    if not images:
        detail = "; ".join(problems[:5]) or "no files were found"
        raise CalibrationError(f"no usable fundus image among the {what} ({detail}); pass DICOM studies "
                               "or image files")
    return images


def _holdout_images(holdout: Sequence[str | Path] | None, settings: CalibrationSettings,
                    calibration_files: Sequence[Path], workdir: Path) -> tuple[list[SourceImage], str]:
    if holdout:
        files = source_files(holdout)
        overlap = {sha256_file(f) for f in files} & {sha256_file(f) for f in calibration_files}
        if overlap:
            raise CalibrationError(f"{len(overlap)} held-out file(s) are also calibration files; the gate must "
                                   "judge on images the calibration never saw")
        return _decode_images(files, settings.holdout_images, "held-out files"), "user"
    from fundusrt.synth import write_study

    for i in range(settings.holdout_studies):
        write_study(workdir / f"holdout_{i}", HOLDOUT_SEED + i, size=HOLDOUT_SIZE)
    return _decode_images(source_files([workdir]), settings.holdout_images, "synthetic studies"), "synthetic"


def _calibration_set(fp32: Pipeline, files: Sequence[Path], prompts: list, settings: CalibrationSettings,
                     cache_dir: Path, record_decoder: bool) -> tuple[CalibrationSet, Path, bool]:
    key = calibration_key(fp32.manifest_sha256, files, prompts, {**settings.recording(), "decoder": record_decoder})
    directory = cache_dir / key[:32]
    cached = CalibrationSet.load(directory, key)
    if cached is not None:
        return cached, directory, True
    images = _decode_images(files, settings.max_images, "calibration files")
    recorded = record_calibration_set(
        fp32, images, prompts, key=key, prompts_per_image=settings.prompts_per_image,
        decode_steps=settings.decode_steps, record_decoder=record_decoder,
        info={"images": len(images), "files": len(files), "prompts": len(prompts)})
    recorded.save(directory)
    return recorded, directory, False


def _tool_versions() -> dict[str, str]:
    versions = {}
    for dist in ("onnxruntime", "onnx"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def _quantise(source: Path, manifest: Manifest, calib: CalibrationSet, options: QuantOptions, staging: Path,
              cache: Path) -> dict[str, Any]:
    """Replace the quantised components in `staging` and update `manifest` in place; return their summaries."""
    summaries: dict[str, Any] = {"embed": {"mode": "fp32"}}
    for component in QUANTISED_COMPONENTS:
        spec = manifest.components[component]
        mode = options.decoder if component == "decoder" else "qdq"
        if mode == "fp32":
            summaries[component] = {"mode": "fp32"}
            continue
        work = Path(tempfile.mkdtemp(dir=staging, prefix=f".{component}."))
        suffix = "int8" if mode == "qdq" else mode.replace("-weight", "w").replace("-dq", "dq")
        out = work / f"{component}.{suffix}.onnx"
        if mode == "qdq":
            summary = quantize_qdq(source / spec.file, out, calib.feeds[component], options,
                                   ranges_cache=cache / f"{component}-{options.ranges_tag()}-ranges.json")
        else:
            summary = quantize_weight_only(source / spec.file, out, int(mode[3]), options.block_size,
                                           options.accuracy_level, dequantize_linear=mode.endswith("-dq"),
                                           awq_feeds=calib.feeds[component] if options.awq else None)
        for old in (spec.file, *spec.data_files):
            (staging / old).unlink()
        data_files = {}
        for file in work.iterdir():
            file.rename(staging / file.name)
            if file.name != out.name:
                data_files[file.name] = sha256_file(staging / file.name)
        work.rmdir()
        manifest.components[component] = dataclasses.replace(
            spec, file=out.name, sha256=sha256_file(staging / out.name), data_files=data_files)
        summaries[component] = {"mode": mode, **summary}
    return summaries


def _kept_decoder(manifest: Manifest, options: QuantOptions, source: Path) -> str | None:
    """None for an fp32 package (everything may be quantised); for a package whose decoder onnxruntime-genai's
    builder already made ("fp32+decoder-int4"), that decoder's precision: only vision and connector are
    quantised then, and the decoder is kept as it is (`--decoder fp32`)."""
    if manifest.precision == "fp32":
        return None
    prefix = "fp32+decoder-"
    if manifest.precision.startswith(prefix) and manifest.decoder.kv_cache == "shared":
        if options.decoder != "fp32":
            raise CalibrationError(f"{source}'s decoder was built and quantised by onnxruntime-genai's builder "
                                   f"({manifest.precision}); pass --decoder fp32 to quantise vision and connector "
                                   "and keep that decoder")
        return manifest.precision[len(prefix):]
    raise CalibrationError(f"{source} is a {manifest.precision} package; calibrate the fp32 export")


def calibrate_package(
    package_dir: str | Path,
    sources: Sequence[str | Path],
    out_dir: str | Path,
    *,
    prompts_file: str | Path | None = None,
    options: QuantOptions | None = None,
    thresholds: GateThresholds | None = None,
    settings: CalibrationSettings | None = None,
    holdout: Sequence[str | Path] | None = None,
    cache_dir: str | Path | None = None,
    force: bool = False,
    overwrite: bool = False,
    threads: int | None = None,
) -> CalibrationResult:
    """Quantise an fp32 package to INT8, gate it against fp32 on held-out images, and write it.

    Args:
        package_dir: the fp32 package.
        sources: DICOM files, study folders or image files to calibrate on.
        out_dir: the INT8 package directory to create.
        prompts_file: questions (see `load_prompts`); default: the package's plus standard MCQs.
        options: method and decoder mode.
        thresholds: the gate's minimum figures.
        settings: sizes of the calibration and held-out sets.
        holdout: held-out files/folders; default: synthetic studies written for the purpose.
        cache_dir: where calibration sets and ranges are cached (default: `default_cache_dir()`).
        force: write the package even when it fails the gate (the manifest says it failed).
        overwrite: replace an existing `out_dir`.
        threads: intra-op threads of the ONNX Runtime sessions.

    Raises:
        CalibrationError: unusable inputs or settings.
        GateFailedError: the gate failed and `force` was not given (nothing is written).
    """
    source, out = Path(package_dir), Path(out_dir)
    options, thresholds = options or QuantOptions(), thresholds or GateThresholds()
    settings = settings or CalibrationSettings()
    if out.exists() and not overwrite:
        raise CalibrationError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.resolve() == source.resolve():
        raise CalibrationError("--out must differ from the fp32 package")
    fp32 = load_package(source, "ort-cpu", threads=threads)
    kept_decoder = _kept_decoder(fp32.manifest, options, source)
    prompts = load_prompts(prompts_file, fp32.default_questions)
    files = source_files(sources)
    calib, cache, hit = _calibration_set(fp32, files, prompts, settings, Path(cache_dir or default_cache_dir()),
                                         record_decoder=kept_decoder is None)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        manifest = Manifest.load(staging)
        summaries = _quantise(source, manifest, calib, options, staging, cache)
        manifest.precision = ("int8-qdq" if options.decoder == "qdq"
                              else f"int8-qdq+decoder-{kept_decoder or options.decoder}")
        manifest.tool_versions = {**manifest.tool_versions, **_tool_versions()}
        manifest.extra[QUANTIZATION_KEY] = {
            **options.to_dict(), "format": "QDQ", "activations": "int8 symmetric per-tensor",
            "weights": "int8 symmetric per-channel", "components": summaries,
            "calibration": {**calib.info, "key": calib.key, "decoder_samples": len(calib.feeds.get("decoder", []))},
            "source_package": {"name": fp32.manifest.name, "manifest_sha256": fp32.manifest_sha256},
        }
        manifest.save(staging)
        quant = load_package(staging, "ort-cpu", threads=threads)
        with tempfile.TemporaryDirectory(dir=staging, prefix=".holdout.") as workdir:
            images, kind = _holdout_images(holdout, settings, files, Path(workdir))
            report = evaluate_gate(fp32, quant, images, prompts, thresholds, max_new_tokens=settings.gate_tokens)
        report.holdout["source"] = kind
        manifest.extra[GATE_KEY] = {**report.to_dict(), "forced": force and not report.passed}
        manifest.save(staging)
        if not report.passed and not force:
            raise GateFailedError(report)
        publish_package(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CalibrationResult(package_dir=out, gate=report, cache_dir=cache, cache_hit=hit)


def gate_package(
    package_dir: str | Path,
    reference_dir: str | Path,
    *,
    prompts_file: str | Path | None = None,
    thresholds: GateThresholds | None = None,
    settings: CalibrationSettings | None = None,
    holdout: Sequence[str | Path] | None = None,
    threads: int | None = None,
) -> GateReport:
    """Gate a package quantised elsewhere (`fundusrt export --decoder int4`) against its reference package.

    The verdict, figures and the reference's identity are written into the package's manifest (atomically)
    whether it passes or not, so that `fundusrt run` and reports can say whether it was gated and how.

    Args:
        package_dir: the quantised package; its manifest is updated.
        reference_dir: the package it must answer like (the fp32 or 16-bit export of the same checkpoint).
        prompts_file, thresholds, settings, holdout, threads: as for `calibrate_package`.
    """
    package, reference_path = Path(package_dir), Path(reference_dir)
    thresholds, settings = thresholds or GateThresholds(), settings or CalibrationSettings()
    if package.resolve() == reference_path.resolve():
        raise CalibrationError("the reference must be another package (the unquantised export)")
    reference = load_package(reference_path, "ort-cpu", threads=threads)
    candidate = load_package(package, "ort-cpu", threads=threads)
    if reference.manifest.decoder.vocab_size != candidate.manifest.decoder.vocab_size:
        raise CalibrationError("the reference package has another vocabulary: gate against the export of the "
                               "same checkpoint")
    prompts = load_prompts(prompts_file, reference.default_questions)
    with tempfile.TemporaryDirectory(prefix="fundusrt-gate.") as workdir:
        images, kind = _holdout_images(holdout, settings, [], Path(workdir))
        report = evaluate_gate(reference, candidate, images, prompts, thresholds, max_new_tokens=settings.gate_tokens)
    report.holdout["source"] = kind
    manifest = Manifest.load(package)
    manifest.extra[GATE_KEY] = {**report.to_dict(), "forced": False, "reference": {
        "name": reference.manifest.name, "precision": reference.manifest.precision,
        "manifest_sha256": reference.manifest_sha256}}
    manifest.save(package)
    return report

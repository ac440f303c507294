"""Seeded fuzzing of read_dicom_file: >= 2,000 mutated writer files, no exception, no hang, no PHI.

Mutations: byte flips, truncations, inserted junk, and tag value edits (geometry, syntax, SOP class,
photometric, pixel data) on small files of every variant and transfer syntax.
"""

from __future__ import annotations

import random
import signal
import time
import warnings
from io import BytesIO

import numpy as np
import pydicom
import pytest
from _dicom_fixtures import COMBINATIONS, PHI_ID, PHI_NAME, small_picture, write_combination

from fundusrt.dicom import read_dicom_file

MUTANTS = 2_000
PER_FILE_SECONDS = 5
TAG_EDITS = {
    "Rows": [0, 1, 7, 65535], "Columns": [0, 3, 65535], "NumberOfFrames": [0, -1, 2, 3, 999999],
    "SamplesPerPixel": [0, 1, 2, 4], "BitsAllocated": [0, 1, 12, 16, 64], "BitsStored": [0, 9, 16, 40],
    "PixelRepresentation": [1, 7], "PlanarConfiguration": [1, 5],
    "PhotometricInterpretation": ["MONOCHROME1", "PALETTE COLOR", "YBR_FULL", "CMYK", "", "RGB"],
    "SOPClassUID": ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.7", "", "9.9"],
    "ImageLaterality": ["", "X", "RL"], "WindowCenter": ["", "1e308"], "WindowWidth": ["0", "-5"],
}
META_SYNTAXES = ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1",
                 "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2", "1.2.3.4", ""]


class _Hang(BaseException):
    """Raised by the alarm; a BaseException so the reader's handlers cannot swallow it."""


def _on_alarm(signum, frame):
    raise _Hang()


def _tag_edit(data: bytes, rng: random.Random) -> bytes | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(BytesIO(data))
        out = BytesIO()
        try:
            _edit(ds, rng)
            ds.save_as(out)
        except Exception:
            return None  # pydicom refused the edit; not a reader input
    return out.getvalue()


def _edit(ds: pydicom.Dataset, rng: random.Random) -> None:
    choice = rng.randrange(4)
    if choice == 0:
        keyword = rng.choice(sorted(TAG_EDITS))
        setattr(ds, keyword, rng.choice(TAG_EDITS[keyword]))
    elif choice == 1:
        ds.file_meta.TransferSyntaxUID = rng.choice(META_SYNTAXES)
    elif choice == 2:
        pixels = bytes(ds.PixelData)
        cut = rng.randrange(len(pixels) + 1)
        ds.PixelData = pixels[:cut] if rng.random() < 0.5 else pixels[:cut] + bytes(rng.randrange(1, 64))
    else:
        keyword = rng.choice(["PixelData", "Rows", "BitsAllocated", "PhotometricInterpretation",
                              "SamplesPerPixel", "SOPClassUID"])
        if keyword in ds:
            delattr(ds, keyword)


def _byte_mutation(data: bytes, rng: random.Random) -> bytes:
    choice = rng.randrange(3)
    buffer = bytearray(data)
    if choice == 0:
        for _ in range(rng.randint(1, 16)):
            buffer[rng.randrange(len(buffer))] = rng.randrange(256)
    elif choice == 1:
        del buffer[rng.randrange(len(buffer)):]
    else:
        at = rng.randrange(len(buffer))
        buffer[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 32)))
    return bytes(buffer)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz_seeds")
    picture = small_picture(40, 32, seed=9)
    return [write_combination(directory, picture, v, t, patient_name=PHI_NAME, patient_id=PHI_ID).read_bytes()
            for v, t in COMBINATIONS]


def test_fuzzed_files_never_raise_or_hang(seeds, tmp_path):
    rng = random.Random(20240611)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    counts = {"ok": 0, "rejected": 0, "error": 0}
    slowest = 0.0
    done = 0
    try:
        while done < MUTANTS:
            base = seeds[done % len(seeds)]
            mutant = _tag_edit(base, rng) if rng.random() < 0.4 else _byte_mutation(base, rng)
            if mutant is None:
                continue
            path = tmp_path / f"m{done % 50}.dcm"
            path.write_bytes(mutant)
            start = time.perf_counter()
            signal.alarm(PER_FILE_SECONDS)
            try:
                images, result = read_dicom_file(path)
            except _Hang:
                pytest.fail(f"mutant {done} (from seed file {done % len(seeds)}) hung over {PER_FILE_SECONDS} s")
            finally:
                signal.alarm(0)
            slowest = max(slowest, time.perf_counter() - start)
            counts[result.status] += 1
            assert result.reason
            assert PHI_NAME not in result.reason and PHI_ID not in result.reason
            if result.status == "ok":
                assert images and all(im.pixels.dtype == np.uint8 and im.pixels.shape == (im.rows, im.columns, 3)
                                      for im in images)
            else:
                assert not images
            done += 1
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"{done} mutants: {counts}; slowest read {slowest * 1000:.0f} ms")
    assert counts["error"] > MUTANTS // 10 and counts["ok"] > 0

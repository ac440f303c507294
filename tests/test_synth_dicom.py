"""DICOM writing of synthetic fundus photographs and studies: round trips, IOD validity, determinism."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from _dicom_fixtures import (
    COMBINATIONS,
    LOSSLESS,
    expected_frames,
    fundus_picture,
    psnr,
    pydicom_reference,
    write_combination,
)

from fundusrt import cli
from fundusrt.dicom import read_dicom_file, read_study
from fundusrt.synth import GROUND_TRUTH_NAME, write_op_image, write_study

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
SOP_CLASS = {"op": OP_8BIT, "op-redfree": OP_8BIT, "op-stereo": OP_8BIT,
             "vl-photo": "1.2.840.10008.5.1.4.1.1.77.1.4", "sc": "1.2.840.10008.5.1.4.1.1.7"}
PHOTOMETRIC = {"jpeg-baseline": "YBR_FULL_422", "j2k-lossless-rct": "YBR_RCT", "j2k-ict": "YBR_ICT",
               "rle": "RGB", "explicit-le": "RGB"}
# Lossy bounds, measured on these pictures (JPEG q92 4:2:2: ~40 dB, J2K ratio 10: ~45 dB). They sit
# far above what a colour-space or subsampling mistake gives (< 20 dB), so they test the colours.
MIN_PSNR = {"jpeg-baseline": 35.0, "j2k-ict": 38.0}
MAX_MEAN_ERROR = {"jpeg-baseline": 3.0, "j2k-ict": 2.0}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Every (variant, transfer syntax) combination written once from the same fundus picture."""
    directory = tmp_path_factory.mktemp("variants")
    image = fundus_picture()
    return {(v, t): write_combination(directory, image, v, t, laterality="L") for v, t in COMBINATIONS}


@pytest.mark.parametrize("variant,syntax", COMBINATIONS)
def test_round_trip_matches_source(written, variant, syntax):
    path = written[(variant, syntax)]
    images, result = read_dicom_file(path)
    assert result.status == "ok", result.reason
    expected = expected_frames(fundus_picture(), variant)
    assert [im.frame_index for im in images] == list(range(len(expected)))
    assert all(im.laterality == "L" and im.sop_class_uid == SOP_CLASS[variant] for im in images)
    decoded = np.stack([im.pixels for im in images])
    assert decoded.dtype == np.uint8 and decoded.shape == expected.shape
    if syntax in LOSSLESS:
        np.testing.assert_array_equal(decoded, expected)
    else:
        error = np.abs(decoded.astype(int) - expected).mean()
        assert psnr(decoded, expected) >= MIN_PSNR[syntax], f"PSNR {psnr(decoded, expected):.1f} dB"
        assert error <= MAX_MEAN_ERROR[syntax], f"mean abs error {error:.2f}"


@pytest.mark.parametrize("variant,syntax", COMBINATIONS)
def test_round_trip_matches_pydicom_decode(written, variant, syntax):
    """Our decode agrees with pydicom's: exactly, except JPEG (Pillow/libjpeg-turbo vs libjpeg upsampling)."""
    path = written[(variant, syntax)]
    images, _ = read_dicom_file(path)
    decoded = np.stack([im.pixels for im in images])
    ds = pydicom.dcmread(path)
    reference = pydicom_reference(ds, "pylibjpeg" if syntax != "rle" else "")
    if reference.ndim == 3:
        reference = np.repeat(reference[..., None], 3, axis=3)
    if syntax == "jpeg-baseline":
        # pydicom's Pillow plugin runs the same libjpeg-turbo: identical.
        pillow = pydicom_reference(ds, "pillow")
        pillow = np.repeat(pillow[..., None], 3, axis=3) if pillow.ndim == 3 else pillow
        np.testing.assert_array_equal(decoded, pillow)
        diff = np.abs(decoded.astype(int) - reference)
        assert diff.max() <= 8 and diff.mean() <= 0.5, f"max {diff.max()} mean {diff.mean():.3f}"
    else:
        np.testing.assert_array_equal(decoded, reference)


@pytest.mark.parametrize("variant,syntax", COMBINATIONS)
def test_header_attributes(written, variant, syntax):
    ds = pydicom.dcmread(written[(variant, syntax)])
    assert ds.SOPClassUID == SOP_CLASS[variant] == ds.file_meta.MediaStorageSOPClassUID
    assert ds.ImageLaterality == "L"
    assert (ds.AnatomicRegionSequence[0].CodeValue, ds.AnatomicRegionSequence[0].CodingSchemeDesignator) == (
        "5665001", "SCT")
    assert ds.PhotometricInterpretation == ("MONOCHROME2" if variant == "op-redfree" else PHOTOMETRIC[syntax])
    assert ds.LossyImageCompression == ("00" if syntax in LOSSLESS else "01")
    assert str(ds.PatientName).startswith("SYNTH^")
    if ds.SOPClassUID == OP_8BIT:
        assert ds.Modality == "OP"
        assert ds.NumberOfFrames == (2 if variant == "op-stereo" else 1)
        assert ds.AcquisitionDeviceTypeCodeSequence[0].CodeValue == "409898007"  # Fundus Camera
        assert "SynchronizationFrameOfReferenceUID" in ds and "AcquisitionContextSequence" in ds
    if variant == "op-redfree":
        assert ds.PresentationLUTShape == "IDENTITY"


def test_jpeg_fragment_is_422_subsampled(written):
    from io import BytesIO

    from PIL import Image
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(written[("op", "jpeg-baseline")])
    fragment = next(generate_frames(ds.PixelData, number_of_frames=1))
    with Image.open(BytesIO(fragment)) as image:
        # (component id, horizontal, vertical sampling, table): luma 2x1, chroma 1x1 = 4:2:2
        assert [(h, v) for _, h, v, _ in image.layer] == [(2, 1), (1, 1), (1, 1)]
        assert "jfif" in image.info


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
def test_dciodvfy_reports_no_errors(written):
    for (variant, syntax), path in written.items():
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        errors = [line for line in lines if line.startswith("Error")]
        warnings = [line for line in lines if line.startswith("Warning")]
        if warnings:
            print(f"{variant}/{syntax}: {len(warnings)} warning(s): {warnings}")
        assert not errors, f"{variant}/{syntax}: {errors}"


def test_write_op_image_rejects_bad_arguments(tmp_path):
    image = fundus_picture()
    cases = [
        (dict(rgb=image.astype(np.float32), laterality="R"), "uint8"),
        (dict(rgb=image[..., 0], laterality="R"), "(H, W, 3)"),
        (dict(rgb=image, laterality="R", variant="op-stereo"), "(2, H, W, 3)"),
        (dict(rgb=image, laterality="B"), "laterality"),
        (dict(rgb=image, laterality="R", variant="oct"), "unknown variant"),
        (dict(rgb=image, laterality="R", transfer_syntax="mpeg2"), "unknown transfer syntax"),
        (dict(rgb=image[:16, :16], laterality="R", transfer_syntax="j2k-ict"), "at least 32 pixels"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            write_op_image(tmp_path / "x.dcm", **kwargs)
    assert not list(tmp_path.iterdir())


def _dicom_files(directory):
    return sorted(p for p in directory.iterdir() if p.suffix == ".dcm")


def test_write_study_both_eyes_shared_uid_and_truth(tmp_path):
    truth = write_study(tmp_path, 5, size=(256, 256))
    files = _dicom_files(tmp_path)
    assert sorted(truth.files) == files
    datasets = [pydicom.dcmread(p) for p in files]
    assert {ds.StudyInstanceUID for ds in datasets} == {truth.study_instance_uid}
    per_eye = {side: sum(ds.ImageLaterality == side for ds in datasets) for side in "RL"}
    assert all(1 <= n <= 3 for n in per_eye.values()), per_eye
    saved = json.loads((tmp_path / GROUND_TRUTH_NAME).read_text())
    assert saved == json.loads(json.dumps(truth.to_dict()))
    assert set(saved["instances"]) == {ds.SOPInstanceUID for ds in datasets}
    for ds, path in zip(datasets, files):
        entry = saved["instances"][ds.SOPInstanceUID]
        assert entry["file"] == path.name and entry["laterality"] == ds.ImageLaterality
        assert entry["frames"] == int(ds.get("NumberOfFrames", 1))
        assert {"dr_grade", "lesions", "disc_center", "cup_to_disc_ratio"} <= set(entry)
    study = read_study(files)
    assert study.study_instance_uid == truth.study_instance_uid and not study.errors()


def test_write_study_is_deterministic(tmp_path):
    first = write_study(tmp_path / "a", 11, size=(256, 256), transfer_syntaxes=["rle", "explicit-le"])
    second = write_study(tmp_path / "b", 11, size=(256, 256), transfer_syntaxes=["rle", "explicit-le"])
    other = write_study(tmp_path / "c", 12, size=(256, 256), transfer_syntaxes=["rle"])
    assert [p.read_bytes() for p in first.files] == [p.read_bytes() for p in second.files]
    assert first.study_instance_uid != other.study_instance_uid


def test_write_study_rejects_unknown_choices(tmp_path):
    with pytest.raises(ValueError, match="variants"):
        write_study(tmp_path, 1, variants=["op", "hologram"])
    with pytest.raises(ValueError, match="seed"):
        write_study(tmp_path, -1)


def test_cli_synth_then_study(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--studies", "2", "--seed", "3", "--size", "256x256"]) == 0
    studies = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [p.name for p in studies] == ["study_0000", "study_0001"]
    truths = [json.loads((p / GROUND_TRUTH_NAME).read_text()) for p in studies]
    assert [t["seed"] for t in truths] == [3, 4]
    capsys.readouterr()
    assert cli.main(["study", str(studies[0]), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    ok = [e for e in entries if e["status"] == "ok"]
    assert len(ok) == len(truths[0]["instances"])
    assert {e["laterality"] for e in ok} == {"R", "L"}

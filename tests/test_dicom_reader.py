"""The DICOM study reader: decoding against pydicom, selection, laterality, bad input, PHI, CLI."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import struct
import tracemalloc
import warnings
from io import BytesIO

import numpy as np
import pydicom
import pytest
from _dicom_fixtures import (
    PHI_ID,
    PHI_NAME,
    PYDICOM_TEST_FILES,
    psnr,
    pydicom_reference,
    small_picture,
    write_combination,
)
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEGBaseline8Bit

from fundusrt import cli
from fundusrt.dicom import DecodeError, decode_frames, read_dicom_file, read_study
from fundusrt.synth import write_op_image


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path)


def _colour_or_compressed_test_files():
    names = []
    for path in sorted(PYDICOM_TEST_FILES.iterdir()):
        try:
            ds = _load(path)
        except Exception:
            continue
        syntax = ds.get("file_meta", pydicom.Dataset()).get("TransferSyntaxUID")
        if "PixelData" in ds and (ds.get("SamplesPerPixel", 1) == 3 or ds.get("PhotometricInterpretation") ==
                                  "PALETTE COLOR" or (syntax is not None and syntax.is_compressed)):
            names.append(path.name)
    return names


def _expected_rgb8(ds, reference):
    """pydicom's decoded values brought to RGB uint8 by the DICOM formulas (independent of our code)."""
    bits = int(ds.BitsStored)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(reference, ds)
        top = 2.0 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1
        return rgb if rgb.dtype == np.uint8 else np.rint(rgb * 255.0 / top).astype(np.uint8)
    values = reference.astype(np.float64)
    if ds.get("WindowCenter") is not None and reference.ndim == 3:
        center, width = float(np.atleast_1d(ds.WindowCenter)[0]), float(np.atleast_1d(ds.WindowWidth)[0])
        values = values * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        low = center - 0.5 - (width - 1) / 2  # PS3.3 C.11.2.1.2.1, linear
        scaled = (values - low) / (width - 1) * 255.0
    elif bits == 8 and ds.PixelRepresentation == 0:
        scaled = values
    else:
        offset = 2.0 ** (bits - 1) if ds.PixelRepresentation == 1 else 0.0
        scaled = (values + offset) * 255.0 / (2.0 ** bits - 1)
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if reference.ndim == 3:  # frames of single-sample data
        out = 255 - out if ds.PhotometricInterpretation == "MONOCHROME1" else out
        out = np.repeat(out[..., None], 3, axis=3)
    return out


@pytest.mark.parametrize("name", _colour_or_compressed_test_files())
def test_pydicom_test_files_decode_like_pydicom(name):
    ds = _load(PYDICOM_TEST_FILES / name)
    baseline = ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    try:
        # For JPEG Baseline the reference is pydicom's Pillow plugin: same libjpeg-turbo as our fast path.
        reference = pydicom_reference(ds, "pillow" if baseline else "")
    except Exception as exc:
        with pytest.raises(DecodeError):
            decode_frames(ds)
        pytest.skip(f"pydicom cannot decode it either ({type(exc).__name__}); ours raised DecodeError")
    decoded = np.stack(decode_frames(ds))
    np.testing.assert_array_equal(decoded, _expected_rgb8(ds, reference))


def test_jpeg_baseline_fast_path_agrees_with_pylibjpeg():
    ds = _load(PYDICOM_TEST_FILES / "examples_ybr_color.dcm")  # 30 frames, YBR_FULL_422
    decoded = np.stack(decode_frames(ds)).astype(int)
    diff = np.abs(decoded - pydicom_reference(ds, "pylibjpeg"))
    # libjpeg-turbo and libjpeg differ only in IDCT rounding and chroma upsampling.
    assert diff.max() <= 8 and diff.mean() <= 0.1, f"max {diff.max()} mean {diff.mean():.3f}"


def _jpeg_file(tmp_path, stream, photometric, name):
    ds = _load(write_combination(tmp_path, small_picture(64, 48), "op", "jpeg-baseline"))
    ds.PhotometricInterpretation = photometric
    ds.PixelData = encapsulate([stream])
    path = tmp_path / name
    ds.save_as(path)
    return path


@pytest.mark.parametrize("keep_rgb,photometric", [(True, "RGB"), (False, "RGB"), (False, "YBR_FULL")])
def test_jpeg_colour_space_from_stream_markers(tmp_path, keep_rgb, photometric):
    """RGB-coded streams stay RGB; JFIF (YCbCr) streams are converted even when (0028,0004) says RGB."""
    source = small_picture(64, 48, seed=3)
    buffer = BytesIO()
    from PIL import Image

    Image.fromarray(source).save(buffer, format="JPEG", quality=95, subsampling=0, keep_rgb=keep_rgb)
    path = _jpeg_file(tmp_path, buffer.getvalue(), photometric, f"c_{keep_rgb}_{photometric}.dcm")
    images, result = read_dicom_file(path)
    assert result.status == "ok", result.reason
    assert psnr(images[0].pixels, source) > 33, "colours are wrong"
    reference = pydicom_reference(_load(path), "pylibjpeg")[0]
    assert np.abs(images[0].pixels.astype(int) - reference).max() <= 4


def test_rgb_jpeg_without_markers_is_read_raw(tmp_path):
    """A stream with neither JFIF nor Adobe marker nor RGB ids is RGB when (0028,0004) says so."""
    source = small_picture(64, 48, seed=4)
    buffer = BytesIO()
    from PIL import Image

    Image.fromarray(source).save(buffer, format="JPEG", quality=95, subsampling=0, keep_rgb=True)
    stream = bytearray(buffer.getvalue())
    sof = stream.index(b"\xff\xc0")
    for i in range(3):  # component ids "R", "G", "B" -> 1, 2, 3 (libjpeg would then assume YCbCr)
        stream[sof + 10 + 3 * i] = i + 1
    scan = stream.index(b"\xff\xda")
    for i in range(3):
        stream[scan + 5 + 2 * i] = i + 1
    path = _jpeg_file(tmp_path, bytes(stream), "RGB", "nomarker.dcm")
    images, result = read_dicom_file(path)
    assert result.status == "ok", result.reason
    assert psnr(images[0].pixels, source) > 33


def test_grey_jpeg_frame_decodes_like_pillow(tmp_path):
    """A one-component JPEG Baseline frame (red-free) takes the libjpeg-turbo path to three equal channels."""
    from PIL import Image

    grey = small_picture(64, 48, seed=6)[..., 1]
    buffer = BytesIO()
    Image.fromarray(grey).save(buffer, format="JPEG", quality=90)
    path = _jpeg_file(tmp_path, buffer.getvalue(), "MONOCHROME2", "grey.dcm")
    ds = _load(path)
    ds.SamplesPerPixel = 1
    ds.save_as(path)
    images, result = read_dicom_file(path)
    assert result.status == "ok", result.reason
    expected = np.asarray(Image.open(BytesIO(buffer.getvalue())))
    np.testing.assert_array_equal(images[0].pixels, np.dstack([expected] * 3))


def test_sixteen_bit_and_monochrome1_scaling(tmp_path):
    ds = _load(write_combination(tmp_path, small_picture(), "op-redfree", "explicit-le"))
    values = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 3) % 4096
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelData = values.tobytes()
    ds.save_as(tmp_path / "m2.dcm")
    images, result = read_dicom_file(tmp_path / "m2.dcm")
    assert result.status == "ok", result.reason
    expected = np.rint(values * 255.0 / 4095).astype(np.uint8)
    np.testing.assert_array_equal(images[0].pixels, np.dstack([expected] * 3))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.WindowCenter, ds.WindowWidth = 2048, 1024
    ds.save_as(tmp_path / "m1.dcm")
    images, _ = read_dicom_file(tmp_path / "m1.dcm")
    low, high = 2048 - 0.5 - 511.5, 2048 - 0.5 + 511.5
    windowed = np.clip(np.rint((values - low) / (high - low) * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(images[0].pixels[..., 0], 255 - windowed)


def test_selection_accepts_fundus_and_rejects_the_rest(tmp_path):
    ct = read_dicom_file(PYDICOM_TEST_FILES / "CT_small.dcm")[1]
    assert ct.status == "rejected" and "CT Image Storage" in ct.reason and "not a fundus" in ct.reason
    sr = read_dicom_file(PYDICOM_TEST_FILES / "test-SR.dcm")[1]
    assert sr.status == "rejected" and "SR" in sr.reason
    plain_sc = read_dicom_file(PYDICOM_TEST_FILES / "SC_rgb_rle.dcm")[1]
    assert plain_sc.status == "rejected" and "without a retina/fundus hint" in plain_sc.reason
    ds = _load(PYDICOM_TEST_FILES / "SC_rgb_rle.dcm")
    ds.BodyPartExamined = "EYE"
    ds.save_as(tmp_path / "sc_eye.dcm")
    images, hinted = read_dicom_file(tmp_path / "sc_eye.dcm")
    assert hinted.status == "ok" and "BodyPartExamined EYE" in hinted.reason and len(images) == 1
    pdf = pydicom.Dataset()
    pdf.SOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    pdf.SOPInstanceUID = "1.2.3.4"
    pdf.Modality = "DOC"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n"
    pdf.file_meta = pydicom.dataset.FileMetaDataset()
    pdf.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pdf.file_meta.MediaStorageSOPClassUID = pdf.SOPClassUID
    pdf.file_meta.MediaStorageSOPInstanceUID = pdf.SOPInstanceUID
    pdf.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    result = read_dicom_file(tmp_path / "report.dcm")[1]
    assert result.status == "rejected" and "Encapsulated PDF" in result.reason


@pytest.mark.parametrize("image_laterality,series_laterality,expected", [
    ("R", None, "R"), ("L", "R", "L"), (None, "L", "L"), (None, None, None), ("B", None, None), ("U", "R", "R"),
])
def test_laterality(tmp_path, image_laterality, series_laterality, expected):
    ds = _load(write_combination(tmp_path, small_picture(), "op", "rle"))
    del ds.ImageLaterality
    if image_laterality:
        ds.ImageLaterality = image_laterality
    if series_laterality:
        ds.Laterality = series_laterality
    ds.save_as(tmp_path / "lat.dcm")
    images, result = read_dicom_file(tmp_path / "lat.dcm")
    assert result.status == "ok" and result.laterality == expected and images[0].laterality == expected


def _bad_inputs(tmp_path):
    """name -> (bytes or path written, expected status, fragment of the reason)."""
    picture = small_picture()
    good_jpeg = write_combination(tmp_path, picture, "op", "jpeg-baseline")
    good_stereo = write_combination(tmp_path, picture, "op-stereo", "rle")
    native = write_combination(tmp_path, picture, "op", "explicit-le")
    data = good_jpeg.read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "truncated.dcm").write_bytes(data[: len(data) // 2])
    (bad / "notes.txt").write_bytes(b"not a dicom file\n" * 20)
    (bad / "empty.dcm").write_bytes(b"")

    def edited(name, edit, source=native):
        ds = _load(source)
        edit(ds)
        ds.save_as(bad / name)

    edited("no_pixels.dcm", lambda ds: delattr(ds, "PixelData"))
    edited("wrong_size.dcm", lambda ds: setattr(ds, "Rows", ds.Rows + 7))
    edited("bomb_header.dcm", lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535),
                                          setattr(ds, "NumberOfFrames", 1000)))

    def mpeg(ds):
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    edited("mpeg2.dcm", mpeg, good_jpeg)

    def codestream_bomb(ds):
        stream = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
        sof = stream.index(b"\xff\xc0")
        stream[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
        ds.PixelData = encapsulate([bytes(stream)])
    edited("jpeg_bomb.dcm", codestream_bomb, good_jpeg)
    shutil.copy(PYDICOM_TEST_FILES / "CT_small.dcm", bad / "ct.dcm")
    return {
        good_jpeg.name: ("ok", "1 frame(s) decoded"),
        good_stereo.name: ("ok", "2 frame(s) decoded"),
        native.name: ("ok", "1 frame(s) decoded"),
        "truncated.dcm": ("error", "may be truncated"),
        "notes.txt": ("error", "not a DICOM file"),
        "empty.dcm": ("error", "not a DICOM file"),
        "no_pixels.dcm": ("error", "no Pixel Data"),
        "wrong_size.dcm": ("error", "could not be decoded"),
        "bomb_header.dcm": ("error", "over the limit"),
        "mpeg2.dcm": ("error", "not supported"),
        "jpeg_bomb.dcm": ("error", "the codestream is 60000x60000 but the header says 40x32"),
        "ct.dcm": ("rejected", "not a fundus photograph"),
    }


def test_bad_files_become_errors_and_the_rest_still_loads(tmp_path):
    expected = _bad_inputs(tmp_path)
    tracemalloc.start()
    study = read_study(tmp_path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    by_name = {r.file.rsplit("/", 1)[-1]: r for r in study.files}
    assert set(by_name) == set(expected)
    for name, (status, fragment) in expected.items():
        assert by_name[name].status == status, (name, by_name[name].reason)
        assert fragment in by_name[name].reason, (name, by_name[name].reason)
    assert len(study.images) == 4 and len(study.errors()) == len(expected) - 3
    # The 65535x65535x1000 header and the 60000x60000 JPEG were refused before any allocation.
    assert peak < 50e6, f"peak memory {peak / 1e6:.0f} MB"


def test_read_study_accepts_lists_and_reports_missing_paths(tmp_path):
    first = write_combination(tmp_path, small_picture(), "op", "rle")
    study = read_study([first, tmp_path / "missing.dcm"])
    assert [r.status for r in study.files] == ["ok", "error"]
    assert "cannot be opened" in study.files[1].reason


def test_no_phi_in_results_or_logs(tmp_path, caplog, capsys):
    path = write_combination(tmp_path, small_picture(), "op", "jpeg-baseline", patient_name=PHI_NAME,
                             patient_id=PHI_ID)
    ds = _load(path)
    ds.PatientBirthDate = "19450308"
    ds.InstitutionName = "SENTINEL HOSPITAL"
    ds.save_as(path)
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(path.read_bytes()[:-300])
    with caplog.at_level(logging.DEBUG):
        study = read_study(tmp_path)
        assert cli.main(["study", str(tmp_path)]) == 0
        assert cli.main(["study", str(tmp_path), "--json"]) == 0
    printed = capsys.readouterr()
    texts = [caplog.text, printed.out, printed.err, repr(study.images)]
    texts += [json.dumps(r.to_dict()) for r in study.files]
    texts += [repr({k: v for k, v in dataclasses.asdict(im).items() if k != "pixels"}) for im in study.images]
    for sentinel in ("SENTINEL", "19450308", "ID-4711"):  # bare digits could be part of a random UID
        assert not any(sentinel in text for text in texts), sentinel
    assert [r.status for r in study.files] == ["error", "ok"]


def test_cli_study_json_and_text(tmp_path, capsys):
    write_combination(tmp_path, small_picture(), "op-stereo", "j2k-lossless-rct", laterality="L")
    assert cli.main(["study", str(tmp_path), "--json"]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert set(entry) == {"file", "status", "reason", "laterality", "rows", "columns", "frames",
                          "photometric_interpretation", "transfer_syntax", "sop_class", "laterality_source",
                          "image_laterality", "image_laterality_confidence", "laterality_mismatch"}
    assert (entry["status"], entry["laterality"], entry["frames"], entry["rows"], entry["columns"]) == (
        "ok", "L", 2, 32, 40)
    assert entry["photometric_interpretation"] == "YBR_RCT"
    assert cli.main(["study", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "JPEG 2000 Image Compression (Lossless Only)" in out and "2 fundus image(s) from 1 file(s)" in out
    assert cli.main(["study", str(tmp_path / "nothing-here")]) == 1


def test_write_op_image_output_reads_back_with_uids(tmp_path):
    path = write_op_image(tmp_path / "a.dcm", small_picture(), laterality="R", study_instance_uid="1.2.3",
                          series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.4.5")
    [image], result = read_dicom_file(path)
    assert (image.study_instance_uid, image.series_instance_uid, image.sop_instance_uid) == (
        "1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert image.modality == "OP" and image.device == "fundusrt synthetic fundus camera"
    assert (image.rows, image.columns, image.source) == (32, 40, str(path))

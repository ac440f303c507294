"""Files as real cameras and other tools write them, not as `fundusrt.synth` does.

- Coded anatomy: VL Photographic (XC) images whose only fundus hint is AnatomicRegionSequence, written
  with plain pydicom and with dcmtk's `img2dcm`, are selected and decoded.
- Real exports omit type 2 attributes and leave others empty or malformed (a TOPCON IMAGEnet OP export
  without StudyID or ReferringPhysicianName crashed the writers): for each attribute the result writers
  read, a source missing it, holding it empty, or holding a malformed value still gives an SR, a Secondary
  Capture and a PDF that dciodvfy accepts, that copy what the source has, and that agree on the study.
- A box the model wrote inverted is left out with the reason; the rest is written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fundusrt.dicom import read_study
from fundusrt.dicom.select import OP_8BIT, VL_PHOTOGRAPHIC, select_fundus
from fundusrt.dicom.sr import PATIENT_STUDY_TYPE2
from fundusrt.dicom.results import write_results
from tests._dicom_fixtures import small_picture
from tests.test_dicom_results import PACKAGE, dciodvfy_errors

RETINA_CODE = ("5665001", "SCT", "Retina")
SKIN_CODE = ("39937001", "SCT", "Skin structure")
SOURCE_VALUES = {
    "PatientName": "DOE^JANE", "PatientID": "ID-77", "PatientBirthDate": "19600101", "PatientSex": "F",
    "StudyDate": "20261201", "StudyTime": "101500", "ReferringPhysicianName": "SMITH^A", "StudyID": "S12",
    "AccessionNumber": "ACC9", "StudyDescription": "Diabetic screening", "IssuerOfPatientID": "CLINIC",
}
MALFORMED = {"PatientSex": "Female", "PatientBirthDate": "1960-01-01", "StudyDate": "01.12.2026",
             "StudyTime": "10:15"}
# (attribute, how the source has it): every attribute the writers read, missing and empty; malformed forms.
CASES = ([(kw, "missing") for kw in (*SOURCE_VALUES, "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID",
                                     "SpecificCharacterSet", "ImageLaterality", "PatientOrientation")]
         + [(kw, "empty") for kw in (*SOURCE_VALUES, "StudyInstanceUID", "SeriesInstanceUID", "ImageLaterality")]
         + [(kw, "malformed") for kw in MALFORMED])


def coded(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def camera_export(path: Path, pixels: np.ndarray, sop_class: str = OP_8BIT, drop: tuple[str, ...] = (),
                  **values: Any) -> Path:
    """An uncompressed RGB instance laid out as a camera's export (plain pydicom, not fundusrt.synth).

    Like the TOPCON IMAGEnet export of the issue: FrameTime 0, empty type 2 acquisition attributes.
    `values` override attributes; `drop` removes them.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OP" if sop_class == OP_8BIT else "XC"
    for keyword, value in SOURCE_VALUES.items():
        setattr(ds, keyword, value)
    ds.Manufacturer, ds.ManufacturerModelName = "TOPCON", ""
    ds.SeriesNumber, ds.InstanceNumber = "", 1
    ds.ImageLaterality = "R"
    ds.PatientOrientation = ""
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.FrameTime = 0
    ds.AcquisitionDateTime = ""
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    for keyword in drop:
        delattr(ds, keyword)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def report_for(path: Path) -> dict[str, Any]:
    """A study report on one source whose answer grounds a valid and an inverted box."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    answer = "<ref>haemorrhage</ref><box>[[100,120,300,340],[500,100,400,200]]</box>"
    return {"study_instance_uid": str(ds.get("StudyInstanceUID", "")), "package": PACKAGE, "errors": [],
            "images": [{"sop_instance_uid": ds.SOPInstanceUID, "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
                        "laterality": "R", "source": str(path), "frame_index": 0, "num_tiles": 1,
                        "answers": [{"question": "Locate the haemorrhages.", "answer": answer}]}]}


# ---------------------------------------------------------------- coded anatomy

def test_vl_photograph_with_coded_retina_is_selected_and_decoded(tmp_path: Path) -> None:
    pixels = small_picture(64, 48)
    retina = camera_export(tmp_path / "retina.dcm", pixels, VL_PHOTOGRAPHIC, drop=("StudyDescription",),
                           AnatomicRegionSequence=[coded(RETINA_CODE)])
    skin = camera_export(tmp_path / "skin.dcm", pixels, VL_PHOTOGRAPHIC, drop=("StudyDescription",),
                         AnatomicRegionSequence=[coded(SKIN_CODE)])
    verdict = select_fundus(pydicom.dcmread(retina, stop_before_pixels=True))
    assert verdict.accepted and "5665001" in verdict.reason
    assert not select_fundus(pydicom.dcmread(skin, stop_before_pixels=True)).accepted
    study = read_study(tmp_path)
    assert [image.sop_instance_uid for image in study.images] == [pydicom.dcmread(retina).SOPInstanceUID]
    assert np.array_equal(study.images[0].pixels, pixels)


def test_img2dcm_vl_photograph_with_coded_retina_is_selected(tmp_path: Path) -> None:
    tool = shutil.which("img2dcm")
    if tool is None:
        pytest.skip("img2dcm not installed (Debian package dcmtk)")
    Image.fromarray(small_picture(96, 64)).save(tmp_path / "photo.jpg", quality=95)
    out = tmp_path / "dicom" / "vlp.dcm"
    out.parent.mkdir()
    keys = [f"AnatomicRegionSequence[0].{kw}={value}"
            for kw, value in zip(("CodeValue", "CodingSchemeDesignator", "CodeMeaning"), RETINA_CODE)]
    subprocess.run([tool, "-vlp", *[arg for key in keys for arg in ("-k", key)], str(tmp_path / "photo.jpg"),
                    str(out)], check=True, capture_output=True, timeout=60)
    ds = pydicom.dcmread(out, stop_before_pixels=True)
    assert ds.SOPClassUID == VL_PHOTOGRAPHIC and ds.Modality == "XC" and "BodyPartExamined" not in ds
    assert select_fundus(ds).accepted
    study = read_study(out.parent)
    assert len(study.images) == 1 and study.images[0].pixels.shape == (64, 96, 3)


# ---------------------------------------------------------------- result writers on real headers

@pytest.mark.parametrize(("keyword", "form"), CASES, ids=[f"{kw}-{form}" for kw, form in CASES])
def test_writers_accept_sources_missing_or_emptying_each_attribute(tmp_path: Path, keyword: str, form: str) -> None:
    overrides: dict[str, Any] = {}
    drop: tuple[str, ...] = ()
    if form == "missing":
        drop = (keyword,)
    elif form == "empty":
        overrides[keyword] = ""
    else:
        overrides[keyword] = MALFORMED[keyword]
    source = camera_export(tmp_path / "source.dcm", small_picture(80, 60), drop=drop, **overrides)
    report = report_for(source)
    results = write_results(report, tmp_path / "out", write_pdf=True)

    names = sorted(r.path.name.split("_")[0] for r in results.files)
    assert names == ["PDF", "SC", "SR", "report"]
    assert any("inverted" in warning for warning in results.warnings)
    saved = json.loads(next(r.path for r in results.files if r.path.suffix == ".json").read_text())
    assert saved["result_warnings"] == results.warnings
    src = pydicom.dcmread(source, stop_before_pixels=True)
    written = [pydicom.dcmread(r.path, stop_before_pixels=True) for r in results.files if r.path.suffix == ".dcm"]
    assert len({ds.StudyInstanceUID for ds in written}) == 1  # SR, SC and PDF in one study
    if src.get("StudyInstanceUID"):
        assert written[0].StudyInstanceUID == src.StudyInstanceUID
    for ds in written:
        for kw in PATIENT_STUDY_TYPE2:
            expected = "" if kw == keyword else SOURCE_VALUES[kw]  # missing, empty or malformed: empty
            assert kw in ds and str(ds.get(kw) or "") == expected, (ds.SOPClassUID, kw)
        assert dciodvfy_errors(Path(next(r.path for r in results.files
                                         if r.sop_instance_uid == ds.SOPInstanceUID))) == [], ds.SOPClassUID


@pytest.mark.slow
def test_run_dicom_out_on_a_camera_export_without_study_id(tiny_package, tmp_path: Path) -> None:
    from tests.test_run_dicom_out import fundusrt_run

    package = tiny_package("internvit-shuffle", seed=1)[1]
    (tmp_path / "study").mkdir()
    camera_export(tmp_path / "study" / "op.dcm", small_picture(128, 96), drop=("StudyID", "ReferringPhysicianName"),
                  PatientName="", PatientSex="")
    out = tmp_path / "out"
    proc = fundusrt_run(str(tmp_path / "study"), "--package", str(package), "--max-new-tokens", "4",
                        "--threads", "1", "--dicom-out", str(out), "--pdf")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name.split("_")[0] for p in out.iterdir()) == ["PDF", "SR", "report"]
    for path in out.glob("*.dcm"):
        assert dciodvfy_errors(path) == [], path.name

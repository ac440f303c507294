"""Findings a viewer can show without SR support: a Secondary Capture with the boxes drawn, and a PDF.

- `build_capture`: the source frame (decoded by the fundusrt reader) with every grounded box and its
  label burned in, as an RGB Secondary Capture (highdicom) in the source's study, with a Source
  Image Sequence pointing back at the frame it was drawn on.
- `build_encapsulated_pdf`: a PDF (the one-page report of `fundusrt.dicom.pdf_report`) wrapped as an
  Encapsulated PDF instance (built with pydicom; highdicom has no class for this IOD).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fundusrt._deps import require
from fundusrt.dicom.findings import LesionBox, study_findings
from fundusrt.dicom.sr import (
    MANUFACTURER,
    PATIENT_STUDY_TYPE2,
    PDF_SERIES_NUMBER,
    SC_SERIES_NUMBER,
    ResultWriteError,
    fallback_study_uid,
    load_sources,
    result_header,
    save_dataset,
)

ENCAPSULATED_PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
# Colour per region kind (RGB); unknown kinds are drawn white.
BOX_COLOURS: dict[str | None, tuple[int, int, int]] = {
    "microaneurysm": (255, 64, 64),
    "haemorrhage": (255, 0, 255),
    "hard_exudate": (255, 255, 0),
    "cotton_wool_spot": (0, 255, 255),
    "drusen": (64, 255, 64),
    "neovascularisation": (255, 128, 0),
    "optic_disc": (64, 128, 255),
}
DEFAULT_COLOUR = (255, 255, 255)
# Attributes of the Patient and General Study modules copied into the PDF instance when the source has them.
PATIENT_STUDY_ATTRIBUTES = (*PATIENT_STUDY_TYPE2, "IssuerOfPatientID", "StudyInstanceUID", "StudyDescription")


def line_width(rows: int, columns: int) -> int:
    """Box outline width in pixels: visible on a 4000 px photograph, not heavy on a 400 px one."""
    return max(2, min(rows, columns) // 250)


def draw_boxes(pixels: np.ndarray, lesions: Sequence[LesionBox]) -> np.ndarray:
    """A copy of `pixels` (H, W, 3 uint8) with each box outlined in its kind's colour and labelled."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ResultWriteError(f"expected an (H, W, 3) uint8 RGB image, got {pixels.dtype} {pixels.shape}")
    rows, columns = pixels.shape[:2]
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    width = line_width(rows, columns)
    font = ImageFont.load_default(size=max(10, min(rows, columns) // 40))
    for lesion in lesions:
        x1, y1, x2, y2 = (round(v) for v in lesion.to_pixels(rows, columns))
        colour = BOX_COLOURS.get(lesion.kind, DEFAULT_COLOUR)
        draw.rectangle((x1, y1, max(x1, x2), max(y1, y2)), outline=colour, width=width)
        # Label above the box, or inside it when the box touches the top edge.
        left, top, right, bottom = draw.textbbox((0, 0), lesion.label, font=font)
        ty = y1 - (bottom - top) - 2 * width if y1 - (bottom - top) - 2 * width >= 0 else y1 + width
        draw.rectangle((x1, ty, x1 + right - left + 2 * width, ty + bottom - top + width), fill=(0, 0, 0))
        draw.text((x1 + width - left, ty - top), lesion.label, fill=colour, font=font)
    return np.asarray(image)


def source_frame(source_path: str | Path, sop_instance_uid: str, frame_index: int) -> Any:
    """The decoded frame `frame_index` of image `sop_instance_uid` in `source_path` (a FundusImage).

    Raises:
        ResultWriteError: the frame cannot be read any more.
    """
    from fundusrt.dicom import read_dicom_file  # the reader owns decoding; imported late to avoid a cycle

    images, result = read_dicom_file(source_path)
    for image in images:
        if image.sop_instance_uid == sop_instance_uid and image.frame_index == frame_index:
            return image
    raise ResultWriteError(f"frame {frame_index} of image {sop_instance_uid} could not be read from "
                           f"{source_path}: {result.status}: {result.reason}")


def build_capture(source_path: str | Path, lesions: Sequence[LesionBox], frame_index: int = 0,
                  instance_number: int = 1, series_instance_uid: str | None = None, header: Any = None) -> Any:
    """A Secondary Capture of one source frame with `lesions` drawn on it.

    Args:
        source_path: the source DICOM file (its SOPInstanceUID must be the lesions').
        lesions: boxes on that frame.
        frame_index: 0-based frame of the source.
        instance_number: of the new instance within its series.
        series_instance_uid: put several captures of one study in one series (default: a new series).
        header: the source's header as `load_sources` gives it (default: read from `source_path`).

    Raises:
        ResultWriteError: the source cannot be read, or the lesions are on another image.
    """
    hd = require("highdicom", "writing DICOM Secondary Capture")
    pydicom = require("pydicom")
    if header is None:
        raw = pydicom.dcmread(source_path, stop_before_pixels=True)
        header = result_header(raw, fallback_study_uid([str(raw.get("SOPInstanceUID"))]))
    wrong = {les.sop_instance_uid for les in lesions} - {header.SOPInstanceUID}
    if wrong:
        raise ResultWriteError(f"boxes of image(s) {sorted(wrong)} cannot be drawn on {header.SOPInstanceUID}")
    image = source_frame(source_path, header.SOPInstanceUID, frame_index)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=draw_boxes(image.pixels, lesions),
        photometric_interpretation="RGB",
        bits_allocated=8,
        # highdicom needs a patient orientation for a PATIENT coordinate system; a fundus photograph has none
        # in the DICOM sense, so the placeholder is replaced by the source's value (type 2C: may be empty) below.
        coordinate_system="PATIENT",
        patient_orientation=("L", "F"),
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    sc.PatientOrientation = header.get("PatientOrientation", "")
    # General Series Laterality is type 2C for a paired organ: present, empty when the source does not say.
    sc.Laterality = header.ImageLaterality if header.get("ImageLaterality") in ("R", "L") else ""
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SeriesDescription = "fundusrt findings (boxes)"
    sc.DerivationDescription = f"Grounded regions drawn by fundusrt on frame {frame_index + 1} of the source"
    sc.SourceImageSequence = [_source_item(header, frame_index)]
    return sc


def _source_item(ref: Any, frame_index: int) -> Any:
    pydicom = require("pydicom")
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    if int(ref.get("NumberOfFrames", 1) or 1) > 1:
        item.ReferencedFrameNumber = frame_index + 1
    return item


def write_capture(source_path: str | Path, lesions: Sequence[LesionBox], path: str | Path,
                  frame_index: int = 0, instance_number: int = 1, series_instance_uid: str | None = None) -> Path:
    """Build a Secondary Capture (see `build_capture`) and write it (atomically; never over a file)."""
    return save_dataset(build_capture(source_path, lesions, frame_index, instance_number, series_instance_uid),
                        Path(path))


def build_encapsulated_pdf(pdf: bytes, sources: Sequence[Any], title: str = "fundusrt findings report") -> Any:
    """An Encapsulated PDF instance in the sources' study (patient/study copied from the first source).

    Raises:
        ResultWriteError: no sources, sources from several studies, or `pdf` is not a PDF.
    """
    pydicom = require("pydicom")
    if not sources:
        raise ResultWriteError("an encapsulated PDF needs at least one source image to take the study from")
    if len({s.StudyInstanceUID for s in sources}) > 1:
        raise ResultWriteError("the sources belong to several studies; one report per study")
    if not pdf.startswith(b"%PDF-"):
        raise ResultWriteError("the document is not a PDF (it does not start with %PDF-)")
    first = sources[0]
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = first.get("SpecificCharacterSet", "ISO_IR 192")
    for keyword in PATIENT_STUDY_ATTRIBUTES:
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    for keyword in PATIENT_STUDY_TYPE2:  # type 2: present even when empty
        if keyword not in ds:
            setattr(ds, keyword, "")
    now = dt.datetime.now()
    ds.SOPClassUID = ENCAPSULATED_PDF_STORAGE
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesNumber = PDF_SERIES_NUMBER
    ds.SeriesDescription = "fundusrt findings (PDF)"
    ds.Manufacturer = MANUFACTURER
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.BurnedInAnnotation = "YES"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    ds.SourceInstanceSequence = [_source_item(s, 0) for s in sources]
    for item in ds.SourceInstanceSequence:  # whole instances are the source of a report, not frames
        if "ReferencedFrameNumber" in item:
            del item.ReferencedFrameNumber
    ds.EncapsulatedDocument = pdf + (b"\0" if len(pdf) % 2 else b"")  # OB values have even length
    ds.EncapsulatedDocumentLength = len(pdf)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    return ds


def write_encapsulated_pdf(report: Any, path: str | Path, sources: Mapping[str, Any] | None = None) -> Path:
    """Write the one-page report of a StudyReport (or its JSON form) as an Encapsulated PDF instance
    (atomically; never over a file); `sources` are the source headers by SOPInstanceUID (default: read)."""
    from fundusrt.dicom.pdf_report import build_pdf_report  # it imports this module's drawing helpers

    data = report.to_dict() if hasattr(report, "to_dict") else report
    sources = dict(sources) if sources is not None else load_sources(data)
    pdf = build_pdf_report(data, study_findings(data), sources)
    return save_dataset(build_encapsulated_pdf(pdf, list(sources.values())), Path(path))

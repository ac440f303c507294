"""Findings as a DICOM Comprehensive SR (TID 1500 measurement report, built with highdicom).

One SR per study, written from the screening protocol's coded results (never from generated text).
Per eye, a measurement group with the eye as finding site (Retina + laterality) holding the eye's
screening decision, the gradability reasons when it is ungradable, the algorithm identification and
the generated text; per protocol item of the eye, a group holding the item's concept coded with the
answer's code and the answer's probability (a NUM, unit "no units"); per grounded lesion, a planar
ROI group with the box as a closed POLYLINE on its source image. Every source image is referenced
(image library and evidence); patient and study attributes are copied from the sources by highdicom;
all UIDs are new.

Codes: the items' concepts and answers are the protocol's (SNOMED CT where the concept is coded there,
else the private scheme 99FUNDUSRT); the structure uses SNOMED CT and DICOM codes (retina, laterality,
lesion, haemorrhage, optic nerve head); the decisions and lesion kinds SNOMED does not give us a
verified code for use 99FUNDUSRT, declared in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt._deps import require
from fundusrt.dicom.findings import CodedItem, CodeTuple, EyeFindings, LesionBox, study_findings
from fundusrt.dicom.select import clean_uid
from fundusrt.manifest import atomic_write_bytes

MANUFACTURER = "fundusrt"
PRIVATE_SCHEME = "99FUNDUSRT"
SR_SERIES_NUMBER = 900
SC_SERIES_NUMBER = 901
PDF_SERIES_NUMBER = 902

RETINA: CodeTuple = ("5665001", "SCT", "Retina")
LATERALITY: dict[str, CodeTuple] = {"R": ("24028007", "SCT", "Right"), "L": ("7771000", "SCT", "Left")}
SCREENING_DECISION: CodeTuple = ("screen-decision", PRIVATE_SCHEME, "Screening decision")
DECISION_CODES: dict[str, CodeTuple] = {
    "refer": ("refer", PRIVATE_SCHEME, "Refer"),
    "no_refer": ("no-refer", PRIVATE_SCHEME, "No referral, rescreen"),
    "ungradable": ("ungradable", PRIVATE_SCHEME, "Ungradable, retake the photograph"),
}
PROBABILITY: CodeTuple = ("probability", PRIVATE_SCHEME, "Probability of the answer")
NO_UNITS: CodeTuple = ("1", "UCUM", "no units")
FINDING: CodeTuple = ("121071", "DCM", "Finding")
CLINICAL_FINDING: CodeTuple = ("404684003", "SCT", "Finding")
LESION: CodeTuple = ("52988006", "SCT", "Lesion")
IMAGING_PROCEDURE: CodeTuple = ("363679005", "SCT", "Imaging procedure")
OPTIC_NERVE_HEAD: CodeTuple = ("81016008", "SCT", "Optic nerve head")
REGION_CODES: dict[str, CodeTuple] = {
    "optic_disc": OPTIC_NERVE_HEAD,
    "haemorrhage": ("50960005", "SCT", "Hemorrhage"),
    "microaneurysm": ("microaneurysm", PRIVATE_SCHEME, "Retinal microaneurysm"),
    "hard_exudate": ("hard-exudate", PRIVATE_SCHEME, "Retinal hard exudate"),
    "cotton_wool_spot": ("cotton-wool-spot", PRIVATE_SCHEME, "Cotton wool spot"),
    "drusen": ("drusen", PRIVATE_SCHEME, "Drusen"),
    "neovascularisation": ("neovascularisation", PRIVATE_SCHEME, "Retinal neovascularisation"),
}


class ResultWriteError(ValueError):
    """A result object cannot be written: unreadable sources, a path that would overwrite a file, ..."""


def code(value: CodeTuple) -> Any:
    """A highdicom CodedConcept from a (value, scheme, meaning) tuple."""
    hd = require("highdicom", "writing DICOM results")
    return hd.sr.CodedConcept(value=value[0], scheme_designator=value[1], meaning=value[2])


# Type 2 attributes of the Patient and General Study modules: every result instance carries them, empty
# when the source has no usable value (real camera exports omit them or leave them empty all the time).
PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")
_VALID_VALUE = {
    "PatientSex": re.compile(r"[MFO]"),
    "PatientBirthDate": re.compile(r"\d{8}"),
    "StudyDate": re.compile(r"\d{8}"),
    "StudyTime": re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?"),
}


def fallback_study_uid(sop_instance_uids: Sequence[str]) -> str:
    """The StudyInstanceUID the results use when their sources carry none: the same for the same sources."""
    pydicom = require("pydicom")
    return pydicom.uid.generate_uid(entropy_srcs=["fundusrt study", *sorted(sop_instance_uids)])


def result_header(ds: Any, study_uid: str) -> Any:
    """A copy of a source header that the result writers can copy from, as DICOM requires.

    What the source has is kept. Type 2 patient/study attributes it lacks, or holds in a form no reader
    accepts (a sex other than M/F/O, a date that is not YYYYMMDD), become empty. A missing or malformed
    StudyInstanceUID becomes `study_uid`, and a missing SeriesInstanceUID or SOPClassUID is taken from
    the file meta or generated from the SOP Instance UID, so that every result references the same values.
    """
    pydicom = require("pydicom")
    header = copy.deepcopy(ds)
    for keyword in PATIENT_STUDY_TYPE2:
        value = header.get(keyword)
        pattern = _VALID_VALUE.get(keyword)
        if value is None or (pattern is not None and not pattern.fullmatch(str(value).strip())):
            setattr(header, keyword, "")
    if not clean_uid(header.get("StudyInstanceUID")):
        header.StudyInstanceUID = study_uid
    if not clean_uid(header.get("SeriesInstanceUID")):
        header.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["fundusrt series",
                                                                          str(header.get("SOPInstanceUID"))])
    meta = getattr(header, "file_meta", None)
    if not clean_uid(header.get("SOPClassUID")) and meta is not None and clean_uid(
            meta.get("MediaStorageSOPClassUID")):
        header.SOPClassUID = meta.MediaStorageSOPClassUID
    return header


def load_sources(report: Any) -> dict[str, Any]:
    """The source headers of a StudyReport or its JSON form, by SOPInstanceUID, ready for the writers.

    Each header is `result_header` of the file; sources without a StudyInstanceUID get the report's, or
    one derived from all the sources' SOP Instance UIDs, so that SR, captures and PDF agree.

    Raises:
        ResultWriteError: a source file is missing, unreadable, or holds another SOPInstanceUID.
    """
    pydicom = require("pydicom")
    data = report.to_dict() if hasattr(report, "to_dict") else report
    sources: dict[str, Any] = {}
    for image in data["images"]:
        uid = image["sop_instance_uid"]
        if uid in sources:
            continue
        try:
            ds = pydicom.dcmread(image["source"], stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise ResultWriteError(f"cannot read the source of image {uid} ({image['source']}): {exc}") from exc
        if not uid or ds.get("SOPInstanceUID") != uid:
            raise ResultWriteError(f"source {image['source']} holds SOPInstanceUID {ds.get('SOPInstanceUID')!r}, "
                                   f"not {uid!r}; was the file replaced after the study was run? (results must "
                                   "reference their source by a well-formed SOPInstanceUID)")
        sources[uid] = ds
    if not sources:
        raise ResultWriteError("the report has no images, so there is nothing to reference")
    study_uid = clean_uid(data.get("study_instance_uid")) or fallback_study_uid(list(sources))
    return {uid: result_header(ds, study_uid) for uid, ds in sources.items()}


def check_output_path(path: Path) -> Path:
    """Refuse to write over an existing file (a source above all); returns the path, parents created."""
    path = Path(path)
    if path.exists():
        raise ResultWriteError(f"{path} already exists; results are never written over a file "
                               "(choose an empty output folder)")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_dataset(ds: Any, path: Path) -> Path:
    """Write a dataset as a DICOM Part 10 file, atomically, refusing to overwrite anything."""
    path = check_output_path(path)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def algorithm_identification(package: Mapping[str, Any], screening: Mapping[str, Any] | None = None) -> Any:
    """TID 4019 algorithm identification: package name, version, and hash/precision/backend as parameters,
    plus the screening protocol (name, version, sha256) and referral threshold when the report has them."""
    hd = require("highdicom", "writing DICOM results")
    name = str(package.get("name") or "unknown model")
    version = str(package.get("version") or package.get("fundusrt_version") or "unknown")
    params = [f"{key}={package[key]}" for key in ("family", "precision", "manifest_sha256", "backend",
                                                   "fundusrt_version") if package.get(key)]
    if screening:
        protocol = screening["protocol"]
        params += [f"protocol={protocol['name']} {protocol['version']}", f"protocol_sha256={protocol['sha256']}",
                   f"referral_threshold={screening['threshold']}"]
    return hd.sr.AlgorithmIdentification(name=name, version=version, parameters=params or None,
                                         manufacturer=MANUFACTURER)


def _finding_site(laterality: str | None) -> Any:
    hd = require("highdicom")
    return hd.sr.FindingSite(anatomic_location=code(RETINA),
                             laterality=code(LATERALITY[laterality]) if laterality in LATERALITY else None)


def _eye_group(eye: EyeFindings, sources: Mapping[str, Any], algorithm: Any) -> Any:
    hd = require("highdicom")
    evaluations = []
    if eye.decision in DECISION_CODES:
        evaluations.append(hd.sr.QualitativeEvaluation(code(SCREENING_DECISION), code(DECISION_CODES[eye.decision])))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=_eye_name(eye.laterality)),
        finding_type=code(CLINICAL_FINDING),
        algorithm_id=algorithm,
        finding_sites=[_finding_site(eye.laterality)],
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[uid]) for uid in eye.images],
    )
    # TID 1501 has no slot for free text; TEXT "Finding" items under the group keep the gradability
    # reasons and the model's words (the Comprehensive SR IOD allows CONTAINER CONTAINS TEXT).
    notes = [f"Ungradable: {reason}" for reason in eye.gradability_reasons] if not eye.gradable else []
    for note in [*notes, eye.text]:
        if note:
            group[0].ContentSequence.append(hd.sr.TextContentItem(code(FINDING), clean_text(note), "CONTAINS"))
    return group


def _item_group(item: CodedItem, eye: EyeFindings, sources: Mapping[str, Any], algorithm: Any) -> Any:
    """One protocol item of one eye: concept -> answer code, and the answer's probability."""
    hd = require("highdicom")
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{_eye_name(eye.laterality)}: "
                                                                             f"{item.item_id}"[:64]),
        finding_type=code(item.concept),
        algorithm_id=algorithm,
        finding_sites=[_finding_site(eye.laterality)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(code(item.concept), code(item.code))],
        measurements=[hd.sr.Measurement(name=code(PROBABILITY), value=round(item.probability, 6),
                                        unit=code(NO_UNITS))],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[uid]) for uid in eye.images],
    )


def clean_text(text: str, limit: int = 65535) -> str:
    """`text` without control characters other than tab and line breaks (not allowed in UT), cut to `limit`."""
    return "".join(c for c in text if c in "\t\n\r" or (c.isprintable() and c != "\x7f"))[:limit]


def _eye_name(laterality: str | None) -> str:
    return {"R": "right eye", "L": "left eye"}.get(laterality or "", "eye not recorded")


def box_polyline(lesion: LesionBox, rows: int, columns: int) -> np.ndarray:
    """The lesion box as a closed POLYLINE (5 points, column/row pixel coordinates, float32)."""
    x1, y1, x2, y2 = lesion.to_pixels(rows, columns)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float32)


def _lesion_group(lesion: LesionBox, n: int, laterality: str | None, source: Any, algorithm: Any) -> Any:
    hd = require("highdicom")
    frames = [lesion.frame_index + 1] if int(source.get("NumberOfFrames", 1) or 1) > 1 else None
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=box_polyline(lesion, int(source.Rows), int(source.Columns)),
        source_image=hd.sr.SourceImageForRegion(source.SOPClassUID, source.SOPInstanceUID, frames),
    )
    kind = code(REGION_CODES[lesion.kind]) if lesion.kind in REGION_CODES else code(LESION)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{lesion.label} {n}"[:64]),
        referenced_region=region,
        finding_type=code(OPTIC_NERVE_HEAD if lesion.kind == "optic_disc" else LESION),
        algorithm_id=algorithm,
        finding_sites=[_finding_site(laterality)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(code(FINDING), kind)],
    )


def build_sr(report: Any, sources: Mapping[str, Any] | None = None) -> Any:
    """The Comprehensive SR of a StudyReport (or its JSON form).

    Args:
        report: the study report; its images' `source` files are read unless `sources` is given.
        sources: source datasets by SOPInstanceUID (headers are enough).

    Raises:
        ResultWriteError: the sources cannot be read or do not match the report.
    """
    hd = require("highdicom", "writing DICOM SR")
    pydicom = require("pydicom")
    data = report.to_dict() if hasattr(report, "to_dict") else report
    sources = dict(sources) if sources is not None else load_sources(data)
    package = data.get("package") or {}
    algorithm = algorithm_identification(package, data.get("screening"))
    groups = []
    for eye in study_findings(data):
        groups.append(_eye_group(eye, sources, algorithm))
        groups += [_item_group(item, eye, sources, algorithm) for item in eye.items]
        groups += [_lesion_group(lesion, n, eye.laterality, sources[lesion.sop_instance_uid], algorithm)
                   for n, lesion in enumerate(eye.lesions, 1)]
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            # Stable per package, so all reports of one model name the same device.
            uid=pydicom.uid.generate_uid(entropy_srcs=[str(package.get("name")), str(package.get("manifest_sha256"))]),
            name=str(package.get("name") or "fundusrt")[:64],
            manufacturer_name=MANUFACTURER,
            model_name=str(package.get("family") or "")[:64] or None,
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=code(IMAGING_PROCEDURE),
        imaging_measurements=groups,
        referenced_images=list(sources.values()),
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=list(sources.values()),
        content=content[0],
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description="fundusrt findings",
    )
    sr.CodingSchemeIdentificationSequence = [_private_scheme_item()]
    # generated text may hold any Unicode; UTF-8 keeps it as written (Latin-1 would replace it)
    sr.SpecificCharacterSet = "ISO_IR 192"
    return sr


def _private_scheme_item() -> Any:
    pydicom = require("pydicom")
    item = pydicom.Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "fundusrt findings"
    item.CodingSchemeResponsibleOrganization = "fundusrt"
    return item


def write_sr(report: Any, path: str | Path, sources: Mapping[str, Any] | None = None) -> Path:
    """Build the Comprehensive SR of `report` and write it to `path` (atomically; never over a file)."""
    return save_dataset(build_sr(report, sources), Path(path))

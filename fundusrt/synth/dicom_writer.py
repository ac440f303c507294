"""Write synthetic fundus photographs as valid DICOM instances.

Variants (what the instance is):
- "op": Ophthalmic Photography 8 Bit Image, colour.
- "op-redfree": the same IOD, MONOCHROME2, the green channel of the photograph (a red-free
  photograph is taken through a green filter, so green is what it records).
- "op-stereo": the same IOD with NumberOfFrames 2 (a stereo pair: `rgb` is (2, H, W, 3)).
- "vl-photo": VL Photographic Image, Modality XC, AnatomicRegionSequence = Retina.
- "sc": Secondary Capture Image, Modality OP, BodyPartExamined EYE.

Transfer syntaxes (how the pixels are stored):
- "jpeg-baseline": JPEG Baseline, YBR_FULL_422, Pillow-encoded with 4:2:2 subsampling, one fragment per frame.
- "j2k-lossless-rct": JPEG 2000 lossless, YBR_RCT (the reversible colour transform).
- "j2k-ict": JPEG 2000 lossy, YBR_ICT (the irreversible colour transform), compression ratio 10.
- "rle": RLE Lossless, RGB.
- "explicit-le": Explicit VR Little Endian, RGB, uncompressed.
For MONOCHROME2 (red-free) there is no colour transform: the J2K syntaxes store one component.

Every type 1 and type 2 attribute of the IODs' mandatory modules is written (dciodvfy reports no
errors for any combination); identifying attributes hold synthetic values only.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    JPEG2000,
    JPEG2000Lossless,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from fundusrt.manifest import atomic_write_bytes

OP_8BIT = UID("1.2.840.10008.5.1.4.1.1.77.1.5.1")
VL_PHOTOGRAPHIC = UID("1.2.840.10008.5.1.4.1.1.77.1.4")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")

TRANSFER_SYNTAXES: dict[str, UID] = {
    "jpeg-baseline": JPEGBaseline8Bit,
    "j2k-lossless-rct": JPEG2000Lossless,
    "j2k-ict": JPEG2000,
    "rle": RLELossless,
    "explicit-le": ExplicitVRLittleEndian,
}
VARIANTS = ("op", "op-redfree", "op-stereo", "vl-photo", "sc")
LOSSY_SYNTAXES = frozenset({"jpeg-baseline", "j2k-ict"})

JPEG_QUALITY = 92
J2K_COMPRESSION_RATIO = 10.0
J2K_MIN_SIDE = 32
_DEFAULT_TIME = datetime(2024, 1, 15, 9, 30, 0)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _frames_of(rgb: np.ndarray, variant: str) -> np.ndarray:
    """Validate `rgb` for `variant`; return (frames, H, W, 3) or (frames, H, W) for red-free."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be a uint8 numpy array, got {type(rgb).__name__} "
                         f"{getattr(rgb, 'dtype', '')}; convert with np.clip(x, 0, 255).astype(np.uint8)")
    if variant == "op-stereo":
        if rgb.ndim != 4 or rgb.shape[0] != 2 or rgb.shape[3] != 3:
            raise ValueError(f"variant 'op-stereo' needs a stereo pair shaped (2, H, W, 3), got {rgb.shape}")
        frames = rgb
    else:
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"variant {variant!r} needs one RGB image shaped (H, W, 3), got {rgb.shape}")
        frames = rgb[None]
    if min(frames.shape[1:3]) < 1 or max(frames.shape[1:3]) > 65535:
        raise ValueError(f"image size {frames.shape[2]}x{frames.shape[1]} is outside 1..65535")
    if variant == "op-redfree":
        frames = frames[..., 1]
    return np.ascontiguousarray(frames)


def _patient_and_study(ds: Dataset, *, patient_name: str, patient_id: str, study_instance_uid: str,
                       acquired: datetime) -> None:
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = acquired.strftime("%Y%m%d")
    ds.StudyTime = acquired.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "SYNTH"
    ds.AccessionNumber = ""
    ds.StudyDescription = "Synthetic fundus study"


def _series_and_equipment(ds: Dataset, *, modality: str, series_instance_uid: str, series_number: int,
                          variant: str) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = {"op": "Colour fundus", "op-redfree": "Red-free fundus",
                            "op-stereo": "Stereo fundus pair", "vl-photo": "Fundus photograph",
                            "sc": "Fundus photograph (secondary capture)"}[variant]
    ds.Manufacturer = "fundusrt"
    ds.ManufacturerModelName = "synthetic fundus camera"
    ds.SoftwareVersions = "fundusrt synth"


def _image_pixel(ds: Dataset, frames: np.ndarray, transfer_syntax: str) -> None:
    colour = frames.ndim == 4
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PhotometricInterpretation = {"jpeg-baseline": "YBR_FULL_422", "j2k-lossless-rct": "YBR_RCT",
                                        "j2k-ict": "YBR_ICT"}.get(transfer_syntax, "RGB")
        ds.PlanarConfiguration = 0
    else:
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PresentationLUTShape = "IDENTITY"
    ds.Rows, ds.Columns = int(frames.shape[1]), int(frames.shape[2])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0


def _ophthalmic_modules(ds: Dataset, *, frames: int, frame_of_reference_uid: str) -> None:
    """Synchronization, Multi-frame, Acquisition Context and the ophthalmic modules of the OP IOD."""
    ds.SynchronizationFrameOfReferenceUID = frame_of_reference_uid
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 500.0  # ms between the two exposures of a stereo pair; 0-interval is meaningless
    ds.PatientEyeMovementCommanded = ""
    ds.RefractiveStateSequence = Sequence()
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.HorizontalFieldOfView = 45
    ds.PupilDilated = ""
    ds.AcquisitionDeviceTypeCodeSequence = Sequence([_code("409898007", "SCT", "Fundus Camera")])
    ds.IlluminationTypeCodeSequence = Sequence()
    ds.LightPathFilterTypeStackCodeSequence = Sequence()
    ds.ImagePathFilterTypeStackCodeSequence = Sequence()
    ds.LensesCodeSequence = Sequence()
    ds.DetectorType = "CCD"


def _encode(ds: Dataset, frames: np.ndarray, transfer_syntax: str) -> None:
    """Set PixelData (and the lossy-compression attributes) for `transfer_syntax`."""
    raw_size = frames.nbytes
    if transfer_syntax == "jpeg-baseline":
        from PIL import Image

        fragments = []
        for frame in frames:
            buffer = io.BytesIO()
            # subsampling=1 is 4:2:2, what YBR_FULL_422 declares; Pillow adds the JFIF marker.
            Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=1)
            fragments.append(buffer.getvalue())
        ds.PixelData = encapsulate(fragments)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        _mark_lossy(ds, raw_size, sum(len(f) for f in fragments), "ISO_10918_1")
        return
    ds.PixelData = frames.tobytes()
    if transfer_syntax == "explicit-le":
        ds.LossyImageCompression = "00"
        return
    kwargs = {"j2k_cr": [J2K_COMPRESSION_RATIO]} if transfer_syntax == "j2k-ict" else {}
    data = frames if frames.shape[0] > 1 else frames[0]
    ds.compress(TRANSFER_SYNTAXES[transfer_syntax], data, generate_instance_uid=False, **kwargs)
    if transfer_syntax == "j2k-ict":
        compressed = sum(len(f) for f in _fragments(ds))
        _mark_lossy(ds, raw_size, compressed, "ISO_15444_1")
    else:
        ds.LossyImageCompression = "00"


def _fragments(ds: Dataset) -> list[bytes]:
    from pydicom.encaps import generate_frames

    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1)))


def _mark_lossy(ds: Dataset, raw_size: int, compressed_size: int, method: str) -> None:
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = f"{raw_size / max(compressed_size, 1):.2f}"
    ds.LossyImageCompressionMethod = method


def write_op_image(
    path: str | Path,
    rgb: np.ndarray,
    *,
    laterality: str,
    transfer_syntax: str = "explicit-le",
    variant: str = "op",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    instance_number: int = 1,
    patient_name: str = "SYNTH^0001",
    patient_id: str = "SYNTH-0001",
    acquired: datetime = _DEFAULT_TIME,
) -> Path:
    """Write one synthetic fundus instance and return its path (written atomically).

    Args:
        path: the .dcm file to write (its folder must exist).
        rgb: uint8 (H, W, 3), or (2, H, W, 3) for variant "op-stereo".
        laterality: "R" or "L" (ImageLaterality).
        transfer_syntax: one of TRANSFER_SYNTAXES (see the module docstring).
        variant: one of VARIANTS (see the module docstring).
        study_instance_uid, series_instance_uid, sop_instance_uid, frame_of_reference_uid: generated when None.
        patient_name, patient_id: synthetic identifiers; never pass real ones.
        acquired: study/content/acquisition date and time.

    Raises:
        ValueError: an unknown variant, syntax or laterality, or an array of the wrong shape or dtype.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer syntax {transfer_syntax!r}; choose one of {', '.join(TRANSFER_SYNTAXES)}")
    if laterality not in ("R", "L"):
        raise ValueError(f"laterality must be 'R' or 'L', got {laterality!r}")
    frames = _frames_of(rgb, variant)
    if transfer_syntax.startswith("j2k") and min(frames.shape[1:3]) < J2K_MIN_SIDE:
        raise ValueError(f"JPEG 2000 (openjpeg, 6 resolution levels) needs at least {J2K_MIN_SIDE} pixels a side, "
                         f"got {frames.shape[2]}x{frames.shape[1]}; use 'rle' or 'explicit-le' for tiny images")
    sop_class = {"vl-photo": VL_PHOTOGRAPHIC, "sc": SECONDARY_CAPTURE}.get(variant, OP_8BIT)
    sop_instance_uid = sop_instance_uid or generate_uid()

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "FUNDUSRT_SYNTH"
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    _patient_and_study(ds, patient_name=patient_name, patient_id=patient_id,
                       study_instance_uid=study_instance_uid or generate_uid(), acquired=acquired)
    modality = "XC" if variant == "vl-photo" else "OP"
    _series_and_equipment(ds, modality=modality, series_instance_uid=series_instance_uid or generate_uid(),
                          series_number=series_number, variant=variant)
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ""
    ds.ContentDate = acquired.strftime("%Y%m%d")
    ds.ContentTime = acquired.strftime("%H%M%S")
    ds.AcquisitionDateTime = acquired.strftime("%Y%m%d%H%M%S")
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if variant != "sc" else ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.RecognizableVisualFeatures = "NO"
    ds.ImageLaterality = laterality
    ds.AnatomicRegionSequence = Sequence([_code("5665001", "SCT", "Retina")])
    if sop_class != SECONDARY_CAPTURE:
        ds.AcquisitionContextSequence = Sequence()
    if sop_class == OP_8BIT:
        _ophthalmic_modules(ds, frames=int(frames.shape[0]),
                            frame_of_reference_uid=frame_of_reference_uid or generate_uid())
    elif sop_class == SECONDARY_CAPTURE:
        ds.ConversionType = "WSD"
        ds.BodyPartExamined = "EYE"
    _image_pixel(ds, frames, transfer_syntax)
    _encode(ds, frames, transfer_syntax)
    ds.file_meta.TransferSyntaxUID = TRANSFER_SYNTAXES[transfer_syntax]

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path

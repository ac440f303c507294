"""DICOM study ingestion: files, folders or lists in, decoded fundus images (RGB uint8) out.

Heavy or optional pieces (Pillow, pylibjpeg plugins) load only when a frame needs them.
"""

from fundusrt.dicom.decode import DEFAULT_MAX_PIXELS, DecodeError, decode_frames
from fundusrt.dicom.model import FileResult, FundusImage, Study
from fundusrt.dicom.reader import laterality_of, read_dicom_file, read_study
from fundusrt.dicom.select import select_fundus

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DecodeError",
    "FileResult",
    "FundusImage",
    "Study",
    "decode_frames",
    "laterality_of",
    "read_dicom_file",
    "read_study",
    "select_fundus",
]

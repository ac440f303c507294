"""Which DICOM instances are fundus photographs.

- Ophthalmic Photography (8/16-bit, and the wide-field stereographic projections): always accepted.
- VL Photographic and the Secondary Capture family: accepted only with a retina/fundus hint
  (Modality OP, AnatomicRegionSequence coding retina/eye/optic disc, BodyPartExamined EYE/RETINA/FUNDUS,
  or "fundus"/"retina" in ImageType, SeriesDescription or ProtocolName). Modality XC alone is not a
  hint: it is what every VL Photographic image carries, skin and wound photographs included.
- Everything else (CT, MR, SR, encapsulated PDF, OCT volumes, ...) is rejected with its SOP class named.

Only coded and enumerated attributes are consulted, and the reasons quote none of their values
except code meanings and enumerated terms, so no free text from the file reaches a log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import UID

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OP_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

_ALWAYS_FUNDUS = frozenset({
    OP_8BIT,
    OP_16BIT,
    "1.2.840.10008.5.1.4.1.1.77.1.5.5",  # Wide Field OP Stereographic Projection
    "1.2.840.10008.5.1.4.1.1.77.1.5.6",  # Wide Field OP 3D Coordinates
})
_NEED_HINT = frozenset({
    VL_PHOTOGRAPHIC,
    SECONDARY_CAPTURE,
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
})
# SNOMED CT: retina, eye, optic disc structure, fundus of eye.
_EYE_CODES = frozenset({"5665001", "81745001", "81016008", "65784005"})
_EYE_WORDS = ("retina", "fundus", "optic disc", "eye")
_BODY_PARTS = frozenset({"EYE", "RETINA", "FUNDUS"})
_TEXT_HINTS = ("FUNDUS", "RETINA", "RETINAL")
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")


def clean_uid(value: object) -> str:
    """`value` if it is a well-formed UID, else "": a corrupt file can put any bytes (PHI) there."""
    text = str(value or "").strip().rstrip("\x00")
    return text if len(text) <= 64 and _UID_PATTERN.fullmatch(text) else ""


def clean_code_string(value: object) -> str:
    """`value` upper-cased if it is a well-formed code string (CS), else ""."""
    text = str(value or "").strip().upper()
    return text if _CODE_STRING.fullmatch(text) else ""


@dataclass(frozen=True)
class Selection:
    """The verdict on one instance: accepted or not, and a reason fit for a log."""

    accepted: bool
    reason: str


def _get(ds: Dataset, keyword: str) -> object:
    """ds.get that answers None instead of raising on a corrupt element (unknown VR, bad value)."""
    try:
        return ds.get(keyword)
    except Exception:
        return None


def sop_class_of(ds: Dataset) -> str:
    """The SOP Class UID from the dataset, else from the file meta; "" if neither is a well-formed UID."""
    meta = _get(ds, "file_meta")
    value = _get(ds, "SOPClassUID") or (_get(meta, "MediaStorageSOPClassUID") if isinstance(meta, Dataset) else "")
    return clean_uid(value)


def describe_sop_class(uid: str) -> str:
    """Human name of a SOP class UID ("CT Image Storage"), or the UID itself when unknown."""
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (uid or "unknown SOP class")


def _text(ds: Dataset, keyword: str) -> str:
    value = _get(ds, keyword)
    if value is None:
        return ""
    if isinstance(value, str):
        return value.upper()
    try:
        return "\\".join(str(v) for v in value).upper()
    except TypeError:
        return str(value).upper()


def fundus_hint(ds: Dataset) -> str | None:
    """Name the first attribute that marks `ds` as a retina/fundus image, or None."""
    if _text(ds, "Modality") == "OP":
        return "Modality OP"
    regions = _get(ds, "AnatomicRegionSequence")
    # pydicom reads a sequence as its own Sequence type (not a list); a malformed element may be anything.
    for item in regions if isinstance(regions, Sequence) else []:
        if not isinstance(item, Dataset):
            continue
        code = str(_get(item, "CodeValue") or "")
        meaning = str(_get(item, "CodeMeaning") or "").lower()
        if code in _EYE_CODES or any(word in meaning for word in _EYE_WORDS):
            return f"AnatomicRegionSequence {clean_code_string(code) or 'eye/retina'}"
    body_part = _text(ds, "BodyPartExamined")
    if body_part in _BODY_PARTS:
        return f"BodyPartExamined {body_part}"
    for keyword in ("ImageType", "SeriesDescription", "ProtocolName"):
        if any(word in _text(ds, keyword) for word in _TEXT_HINTS):
            return f"{keyword} mentions fundus/retina"
    return None


def select_fundus(ds: Dataset) -> Selection:
    """Decide whether `ds` is a fundus photograph to decode (see the module docstring for the rules)."""
    sop_class = sop_class_of(ds)
    name = describe_sop_class(sop_class)
    if sop_class in _ALWAYS_FUNDUS:
        return Selection(True, name)
    if sop_class in _NEED_HINT:
        hint = fundus_hint(ds)
        if hint is None:
            return Selection(False, f"{name} without a retina/fundus hint (Modality OP, AnatomicRegionSequence, "
                                    "BodyPartExamined, ImageType, SeriesDescription or ProtocolName)")
        return Selection(True, f"{name} ({hint})")
    modality = clean_code_string(_get(ds, "Modality"))
    shown = f", modality {modality}" if modality else ""
    return Selection(False, f"{name}{shown} is not a fundus photograph")

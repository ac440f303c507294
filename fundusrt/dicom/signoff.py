"""A grader's sign-off of the AI's findings as a new Comprehensive SR (TID 1500, built with highdicom).

The sign-off never changes the AI's SR: it is a new document in the same study whose

- observer is the grader (a person observer context, with the login name), and the document is marked
  VERIFIED by that person (Verifying Observer Sequence) and COMPLETE;
- Predecessor Documents Sequence and evidence name the AI's SR (the document it signs off);
- per eye, a measurement group with the eye as finding site holds the grader's screening decision
  (same codes as the AI's SR), the AI's decision, whether it was confirmed or overridden, and the
  grader's reason as a comment, referencing the eye's source images.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fundusrt._deps import require
from fundusrt.dicom.sr import (
    CLINICAL_FINDING,
    DECISION_CODES,
    IMAGING_PROCEDURE,
    LATERALITY,
    MANUFACTURER,
    PRIVATE_SCHEME,
    RETINA,
    SCREENING_DECISION,
    ResultWriteError,
    _private_scheme_item,
    clean_text,
    code,
)

SIGNOFF_SERIES_NUMBER = 903
UNKNOWN_EYE = "unknown"  # the report's key for images without laterality (as fundusrt.dicom.findings reads it)
AI_DECISION = ("ai-decision", PRIVATE_SCHEME, "Algorithm's screening decision")
SIGNOFF = ("signoff", PRIVATE_SCHEME, "Grader sign-off")
SIGNOFF_ACTIONS = {
    "confirmed": ("confirmed", PRIVATE_SCHEME, "Confirmed the algorithm's decision"),
    "overridden": ("overridden", PRIVATE_SCHEME, "Overrode the algorithm's decision"),
}
COMMENT = ("121106", "DCM", "Comment")
PERSON = ("121006", "DCM", "Person")
EYE_NAMES = {"R": "right eye", "L": "left eye", UNKNOWN_EYE: "eye not recorded"}


def person_name(text: str) -> str:
    """A DICOM person name (Family^Given) from what a grader typed: kept when it has a caret, else
    "Given Family" becomes "Family^Given" and a single word "Word^"."""
    text = " ".join(text.split())
    if "^" in text or not text:
        return text
    *given, family = text.split(" ")
    return f"{family}^{' '.join(given)}"


def _evidence_stubs(ai_sr: Any) -> dict[str, Any]:
    """Minimal datasets (study, series, class, instance) of the images the AI's SR references, by SOP UID."""
    pydicom = require("pydicom")
    stubs = {}
    for study in ai_sr.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.ReferencedSeriesSequence:
            for ref in series.ReferencedSOPSequence:
                ds = pydicom.Dataset()
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study.StudyInstanceUID, series.SeriesInstanceUID
                ds.SOPClassUID, ds.SOPInstanceUID = ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID
                stubs[str(ds.SOPInstanceUID)] = ds
    return stubs


def build_signoff_sr(ai_sr: Any, eyes: Mapping[str, Mapping[str, str]], eye_images: Mapping[str, Sequence[str]],
                     grader: str, login: str, organization: str) -> Any:
    """The sign-off SR of `ai_sr`.

    Args:
        ai_sr: the AI's Comprehensive SR (a pydicom Dataset) that is signed off.
        eyes: per eye ("R", "L", "unknown"): {"ai", "decision", "action" ("confirmed"/"overridden"), "reason"}.
        eye_images: per eye, the SOP Instance UIDs of its images (the report's ``eyes[eye]["images"]``).
        grader: the grader's name as typed or configured (made a DICOM person name by `person_name`).
        login: the grader's login name.
        organization: the verifying organisation (the clinic).

    Raises:
        ResultWriteError: an eye, decision or action is unknown, or an override has no reason.
    """
    hd = require("highdicom", "writing the sign-off SR")
    stubs = _evidence_stubs(ai_sr)
    groups = []
    for eye, signed in eyes.items():
        if eye not in EYE_NAMES:
            raise ResultWriteError(f"unknown eye {eye!r}: expected one of {sorted(EYE_NAMES)}")
        for key in ("ai", "decision"):
            if signed.get(key) not in DECISION_CODES:
                raise ResultWriteError(f"{EYE_NAMES[eye]}: {key} decision {signed.get(key)!r} is not one of "
                                       f"{sorted(DECISION_CODES)}")
        action = signed.get("action")
        if action not in SIGNOFF_ACTIONS:
            raise ResultWriteError(f"{EYE_NAMES[eye]}: sign-off {action!r} must be 'confirmed' or 'overridden'")
        reason = clean_text(signed.get("reason", "")).strip()
        if action == "overridden" and not reason:
            raise ResultWriteError(f"{EYE_NAMES[eye]}: overriding the algorithm's decision needs a reason")
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"sign-off {EYE_NAMES[eye]}"),
            finding_type=code(CLINICAL_FINDING),
            finding_sites=[hd.sr.FindingSite(anatomic_location=code(RETINA), laterality=(
                code(LATERALITY[eye]) if eye in LATERALITY else None))],
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(code(SCREENING_DECISION), code(DECISION_CODES[signed["decision"]])),
                hd.sr.QualitativeEvaluation(code(AI_DECISION), code(DECISION_CODES[signed["ai"]])),
                hd.sr.QualitativeEvaluation(code(SIGNOFF), code(SIGNOFF_ACTIONS[action])),
            ],
            source_images=[hd.sr.SourceImageForMeasurementGroup(stubs[uid].SOPClassUID, uid)
                           for uid in eye_images.get(eye, []) if uid in stubs] or None,
        )
        if reason:
            group[0].ContentSequence.append(hd.sr.TextContentItem(code(COMMENT), reason, "CONTAINS"))
        groups.append(group)
    if not groups:
        raise ResultWriteError("a sign-off needs at least one eye")
    name = person_name(grader)
    observer = hd.sr.ObserverContext(
        observer_type=code(PERSON),
        observer_identifying_attributes=hd.sr.PersonObserverIdentifyingAttributes(name=name, login_name=login[:64]))
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=observer),
        procedure_reported=code(IMAGING_PROCEDURE),
        imaging_measurements=groups,
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=[ai_sr, *stubs.values()],
        content=content[0],
        series_instance_uid=hd.UID(),
        series_number=SIGNOFF_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=True,
        is_verified=True,
        verifying_observer_name=name,
        verifying_organization=organization[:64],
        previous_versions=[ai_sr],
        series_description="fundusrt grader sign-off",
        specific_character_set="ISO_IR 192",
    )
    sr.CodingSchemeIdentificationSequence = [_private_scheme_item()]
    return sr

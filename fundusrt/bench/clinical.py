"""Findings-level clinical consistency: do the findings a text states agree with the synthetic ground truth?

BLEU and ROUGE reward wording; a clinic cares whether the answer says the right things. The
findings read from a generated text are the fields of FINDING_FIELDS:

- ``dr_grade``: the grade `fundusrt.dicom.findings.parse_dr_grade` reads (None when the text
  states none, which never agrees);
- ``referable_dr``: "non-referable"/"not referable" gives False, "referable" True, otherwise
  the stated grade decides (>= 2), otherwise False;
- ``amd``: `fundusrt.dicom.findings.parse_amd`, unstated meaning absent;
- ``glaucoma_suspect``: "glaucoma" mentioned outside a negated clause;
- one field per lesion kind of `fundusrt.synth.grading.LESION_KINDS`: its name mentioned outside a
  negated clause ("no haemorrhages", "without exudates").

Unstated binary findings read as absent because reports (ours and the synthetic references) list
what is present. An item's consistency is the fraction of fields that agree with its GroundTruth;
the set's score is the mean over items, reported with per-field agreement.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fundusrt.dicom.findings import parse_amd, parse_dr_grade, strip_grounding
from fundusrt.synth.grading import LESION_KINDS, REFERABLE_GRADE, GroundTruth

FINDING_FIELDS = ("dr_grade", "referable_dr", "amd", "glaucoma_suspect", *LESION_KINDS)
_LESION_PATTERNS = {
    "microaneurysm": r"micro-?aneurysms?",
    "haemorrhage": r"ha?emorrhag(?:e|es|ic)",
    "hard_exudate": r"(?:hard\s+)?exudates?",
    "cotton_wool_spot": r"cotton[- ]wool\s+spots?",
    "drusen": r"drusen",
    "neovascularisation": r"neovasculari[sz]ation|\bnv[de]\b",
}
_GLAUCOMA = r"glaucoma"
_CLAUSES = re.compile(r"[.;,\n]+")
_NEGATION = re.compile(r"\b(?:no|not|without|absent|negative\s+for)\b", re.I)
_NOT_REFERABLE = re.compile(r"\bnon[- ]?referable\b|\bnot\s+referable\b", re.I)
_REFERABLE = re.compile(r"\breferable\b", re.I)


@dataclass(frozen=True)
class Findings:
    """What a text states, in the fields of FINDING_FIELDS."""

    dr_grade: int | None
    referable_dr: bool
    amd: bool
    glaucoma_suspect: bool
    lesions: frozenset[str]

    def as_fields(self) -> dict[str, Any]:
        """Field name -> value, lesion kinds as booleans."""
        return {"dr_grade": self.dr_grade, "referable_dr": self.referable_dr, "amd": self.amd,
                "glaucoma_suspect": self.glaucoma_suspect, **{k: k in self.lesions for k in LESION_KINDS}}


def _mentioned(pattern: str, text: str) -> bool:
    """`pattern` occurs in a clause that does not negate it before the mention."""
    regex = re.compile(pattern, re.I)
    for clause in _CLAUSES.split(text):
        match = regex.search(clause)
        if match and not _NEGATION.search(clause[:match.start()]):
            return True
    return False


def read_findings(text: str) -> Findings:
    """The findings a generated or reference text states (rules in the module docstring)."""
    plain = strip_grounding(text)
    grade = parse_dr_grade(plain)
    if _NOT_REFERABLE.search(plain):
        referable = False
    elif _REFERABLE.search(plain):
        referable = True
    else:
        referable = grade is not None and grade >= REFERABLE_GRADE
    lesions = frozenset(kind for kind, pattern in _LESION_PATTERNS.items() if _mentioned(pattern, plain))
    return Findings(dr_grade=grade, referable_dr=referable, amd=bool(parse_amd(plain)),
                    glaucoma_suspect=_mentioned(_GLAUCOMA, plain), lesions=lesions)


def truth_fields(truth: GroundTruth) -> dict[str, Any]:
    """The ground truth in the fields of FINDING_FIELDS."""
    counts = truth.lesion_counts()
    return {"dr_grade": truth.dr_grade, "referable_dr": truth.referable_dr, "amd": truth.amd,
            "glaucoma_suspect": truth.glaucoma_suspect, **{k: counts[k] > 0 for k in LESION_KINDS}}


def consistency(text: str, truth: GroundTruth) -> dict[str, bool]:
    """Per field of FINDING_FIELDS, whether `text` agrees with `truth`."""
    stated, expected = read_findings(text).as_fields(), truth_fields(truth)
    return {field: stated[field] == expected[field] for field in FINDING_FIELDS}


def consistency_score(texts: Sequence[str], truths: Sequence[GroundTruth]) -> dict[str, Any]:
    """Mean findings agreement of texts with their ground truths.

    Returns:
        {"score": mean over items of the fraction of agreeing fields, "per_field": {field: agreement
        rate}, "items": count, "empty_answer_score": the score of an empty answer on the same truths};
        score 0 with no items.
    """
    if len(texts) != len(truths):
        raise ValueError(f"{len(texts)} texts but {len(truths)} ground truths")
    if not texts:
        return {"score": 0.0, "per_field": {}, "items": 0}
    agreements = [consistency(t, g) for t, g in zip(texts, truths, strict=True)]
    per_item = [sum(a.values()) / len(FINDING_FIELDS) for a in agreements]
    per_field = {f: sum(a[f] for a in agreements) / len(agreements) for f in FINDING_FIELDS}
    # What saying nothing scores on the same truths: the floor a real score should be read against.
    empty = [sum(consistency("", g).values()) / len(FINDING_FIELDS) for g in truths]
    return {"score": sum(per_item) / len(per_item), "per_field": per_field, "items": len(agreements),
            "empty_answer_score": sum(empty) / len(empty)}

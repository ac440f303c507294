"""Ground truth for synthetic fundus photographs, and the rules that grade it.

Diabetic retinopathy grade (ICDR-like, from the lesion counts of one image; first rule that
matches wins, from the top):

====  ===============  =====================================================================
4     proliferative    ``neovascularisation >= 1``
3     severe NPDR      ``haemorrhage >= 20``
2     moderate NPDR    ``haemorrhage >= 1`` or ``hard_exudate >= 1`` or ``cotton_wool_spot >= 1``
1     mild NPDR        ``microaneurysm >= 1`` (microaneurysms only)
0     no DR            none of the above; drusen never count towards DR
====  ===============  =====================================================================

The severe rule is a single-field proxy for the ICDR "4-2-1" rule (more than 20 intraretinal
haemorrhages in each of four quadrants): the generator spreads the haemorrhages of a severe
case over all four quadrants around the fovea, but the rule itself reads only the total.
Venous beading and IRMA are not drawn, so they play no part. Referable DR is grade >= 2.

Other flags:

- AMD: ``drusen >= AMD_MIN_DRUSEN`` (8). Healthy eyes may carry a few drusen below it.
- Glaucoma suspect: vertical cup-to-disc ratio ``>= GLAUCOMA_CDR`` (0.65).

Coordinates are image pixels with x to the right and y down; lesion boxes are
``(x0, y0, x1, y1)`` with x1 and y1 exclusive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LESION_KINDS = (
    "microaneurysm",
    "haemorrhage",
    "hard_exudate",
    "cotton_wool_spot",
    "drusen",
    "neovascularisation",
)
SEVERE_HAEMORRHAGES = 20
AMD_MIN_DRUSEN = 8
GLAUCOMA_CDR = 0.65
REFERABLE_GRADE = 2
DR_GRADE_NAMES = ("no DR", "mild NPDR", "moderate NPDR", "severe NPDR", "proliferative DR")


@dataclass(frozen=True)
class Lesion:
    """One drawn lesion.

    Attributes:
        kind: one of LESION_KINDS.
        box: (x0, y0, x1, y1) in image pixels, x1/y1 exclusive; bounds the visible lesion.
        center: (x, y) of the lesion's nominal centre in image pixels.
    """

    kind: str
    box: tuple[int, int, int, int]
    center: tuple[float, float]

    def __post_init__(self) -> None:
        if self.kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {self.kind!r}; expected one of {LESION_KINDS}")
        x0, y0, x1, y1 = self.box
        if not (x0 < x1 and y0 < y1):
            raise ValueError(f"lesion box {self.box} is empty; expected x0 < x1 and y0 < y1")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"kind": self.kind, "box": list(self.box), "center": list(self.center)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Lesion:
        """Inverse of to_dict."""
        _require_keys(d, ("kind", "box", "center"), "lesion")
        x0, y0, x1, y1 = (int(v) for v in d["box"])
        cx, cy = (float(v) for v in d["center"])
        return cls(kind=str(d["kind"]), box=(x0, y0, x1, y1), center=(cx, cy))


def _require_keys(d: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} ground truth is missing {missing}; was it written by fundusrt.synth?")


def validate_counts(counts: dict[str, int]) -> None:
    """Raise ValueError unless `counts` maps known lesion kinds to non-negative ints."""
    for kind, n in counts.items():
        if kind not in LESION_KINDS:
            raise ValueError(f"unknown lesion kind {kind!r}; expected one of {LESION_KINDS}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"count of {kind!r} must be a non-negative int, got {n!r}")


def dr_grade_from_lesions(counts: dict[str, int], *, severe_haemorrhages: int = SEVERE_HAEMORRHAGES) -> int:
    """DR grade 0-4 from lesion counts, by the rules in this module's docstring.

    Args:
        counts: lesion kind -> number of lesions; missing kinds count as 0.
        severe_haemorrhages: haemorrhage count from which the grade is severe (3).

    Returns:
        The ICDR-like grade: 0 none, 1 mild, 2 moderate, 3 severe, 4 proliferative.
    """
    validate_counts(counts)
    n = {kind: counts.get(kind, 0) for kind in LESION_KINDS}
    if n["neovascularisation"] >= 1:
        return 4
    if n["haemorrhage"] >= severe_haemorrhages:
        return 3
    if n["haemorrhage"] + n["hard_exudate"] + n["cotton_wool_spot"] >= 1:
        return 2
    if n["microaneurysm"] >= 1:
        return 1
    return 0


def amd_from_lesions(counts: dict[str, int]) -> bool:
    """AMD flag: at least AMD_MIN_DRUSEN drusen."""
    validate_counts(counts)
    return counts.get("drusen", 0) >= AMD_MIN_DRUSEN


def glaucoma_suspect_from_cdr(cup_to_disc_ratio: float) -> bool:
    """Glaucoma-suspect flag: vertical cup-to-disc ratio at least GLAUCOMA_CDR."""
    return cup_to_disc_ratio >= GLAUCOMA_CDR


@dataclass
class GroundTruth:
    """Everything known about one synthetic fundus photograph.

    Attributes:
        laterality: "R" or "L".
        dr_grade: 0-4, from the lesions by dr_grade_from_lesions.
        referable_dr: dr_grade >= 2.
        amd: drusen count >= AMD_MIN_DRUSEN.
        glaucoma_suspect: cup_to_disc_ratio >= GLAUCOMA_CDR.
        cup_to_disc_ratio: vertical cup diameter / vertical disc diameter.
        disc_center, disc_radius: optic disc centre (x, y) and horizontal radius in pixels.
        fovea_center: (x, y) of the fovea.
        fov_center, fov_radius: the circular field of view (it may extend past the image edges).
        width, height: image size in pixels.
        lesions: every drawn lesion with its box.
        defect: the quality defect applied to the picture (`fundusrt.synth.quality.DEFECTS`), None when
            it is gradable; an ungradable picture's findings are those drawn before the defect hid them.
    """

    laterality: str
    dr_grade: int
    referable_dr: bool
    amd: bool
    glaucoma_suspect: bool
    cup_to_disc_ratio: float
    disc_center: tuple[float, float]
    disc_radius: float
    fovea_center: tuple[float, float]
    fov_center: tuple[float, float]
    fov_radius: float
    width: int
    height: int
    lesions: list[Lesion] = field(default_factory=list)
    defect: str | None = None

    def __post_init__(self) -> None:
        if self.laterality not in ("R", "L"):
            raise ValueError(f"laterality must be 'R' or 'L', got {self.laterality!r}")
        if self.dr_grade not in range(5):
            raise ValueError(f"dr_grade must be 0-4, got {self.dr_grade!r}")
        if self.referable_dr != (self.dr_grade >= REFERABLE_GRADE):
            raise ValueError(
                f"referable_dr={self.referable_dr} contradicts dr_grade={self.dr_grade} (referable is >= 2)"
            )
        if not 0.0 < self.cup_to_disc_ratio < 1.0:
            raise ValueError(f"cup_to_disc_ratio must be in (0, 1), got {self.cup_to_disc_ratio}")

    @classmethod
    def from_lesions(
        cls,
        *,
        laterality: str,
        cup_to_disc_ratio: float,
        disc_center: tuple[float, float],
        disc_radius: float,
        fovea_center: tuple[float, float],
        fov_center: tuple[float, float],
        fov_radius: float,
        width: int,
        height: int,
        lesions: list[Lesion],
    ) -> GroundTruth:
        """Build the ground truth, deriving grade and flags from the lesions and the CDR."""
        gt = cls(
            laterality=laterality,
            dr_grade=0,
            referable_dr=False,
            amd=False,
            glaucoma_suspect=glaucoma_suspect_from_cdr(cup_to_disc_ratio),
            cup_to_disc_ratio=cup_to_disc_ratio,
            disc_center=disc_center,
            disc_radius=disc_radius,
            fovea_center=fovea_center,
            fov_center=fov_center,
            fov_radius=fov_radius,
            width=width,
            height=height,
            lesions=list(lesions),
        )
        counts = gt.lesion_counts()
        gt.dr_grade = dr_grade_from_lesions(counts)
        gt.referable_dr = gt.dr_grade >= REFERABLE_GRADE
        gt.amd = amd_from_lesions(counts)
        return gt

    def lesion_counts(self) -> dict[str, int]:
        """Number of lesions of every kind in LESION_KINDS (zeros included)."""
        counts = dict.fromkeys(LESION_KINDS, 0)
        for lesion in self.lesions:
            counts[lesion.kind] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        return {
            "laterality": self.laterality,
            "dr_grade": self.dr_grade,
            "referable_dr": self.referable_dr,
            "amd": self.amd,
            "glaucoma_suspect": self.glaucoma_suspect,
            "cup_to_disc_ratio": self.cup_to_disc_ratio,
            "disc_center": list(self.disc_center),
            "disc_radius": self.disc_radius,
            "fovea_center": list(self.fovea_center),
            "fov_center": list(self.fov_center),
            "fov_radius": self.fov_radius,
            "width": self.width,
            "height": self.height,
            "lesions": [lesion.to_dict() for lesion in self.lesions],
            "defect": self.defect,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroundTruth:
        """Inverse of to_dict; unknown keys are ignored."""
        _require_keys(
            d,
            (
                "laterality", "dr_grade", "referable_dr", "amd", "glaucoma_suspect", "cup_to_disc_ratio",
                "disc_center", "disc_radius", "fovea_center", "fov_center", "fov_radius", "width", "height",
            ),
            "image",
        )

        def point(key: str) -> tuple[float, float]:
            x, y = (float(v) for v in d[key])
            return (x, y)

        return cls(
            laterality=str(d["laterality"]),
            dr_grade=int(d["dr_grade"]),
            referable_dr=bool(d["referable_dr"]),
            amd=bool(d["amd"]),
            glaucoma_suspect=bool(d["glaucoma_suspect"]),
            cup_to_disc_ratio=float(d["cup_to_disc_ratio"]),
            disc_center=point("disc_center"),
            disc_radius=float(d["disc_radius"]),
            fovea_center=point("fovea_center"),
            fov_center=point("fov_center"),
            fov_radius=float(d["fov_radius"]),
            width=int(d["width"]),
            height=int(d["height"]),
            lesions=[Lesion.from_dict(x) for x in d.get("lesions", [])],
            defect=d.get("defect"),
        )

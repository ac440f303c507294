"""Synthetic colour fundus photographs with ground truth.

Orientation follows the standard fundus photograph (not mirrored): the optic disc lies on the
nasal side, which for a RIGHT eye is the RIGHT side of the image, with the macula to its left; a
left eye is the mirror image (disc on the left, macula to its right). The fovea sits about 2.5
disc diameters temporal to the disc centre and slightly below it.

A picture is a dark surround with a circular field of view (clipped top and bottom on wide
sensors such as 4288x2848), an orange-red retina with vignetting and low-frequency texture, a
darker macula with a foveal pit, a yellowish optic disc with a paler cup, a branching artery/vein
tree from the disc whose temporal arcades curve around the macula, and the lesions of the case
(see fundusrt.synth.grading for the kinds and the grading rules). All anatomy scales with the
FOV radius, so every size looks alike, and everything follows from `CaseSpec.seed`.

Example:
    >>> case = random_case(7, 1024, 1024)
    >>> image, truth = draw_fundus(case)   # image: uint8 (1024, 1024, 3); truth: GroundTruth
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from fundusrt.synth._anatomy import WorkGrid, layout_anatomy, render_retina
from fundusrt.synth._lesions import draw_lesions, plan_lesions
from fundusrt.synth._vessels import grow_vessels, render_vessels
from fundusrt.synth.grading import GroundTruth

MIN_SIDE = 256
MAX_SIDE = 8192
MAX_ASPECT = 2.0
# Sizes random_case picks from when none is given: square crops and common camera frames.
CAMERA_SIZES = ((1024, 1024), (1440, 960), (1536, 1024), (2048, 2048), (2240, 1488))
GRADE_WEIGHTS = (0.3, 0.2, 0.2, 0.15, 0.15)
AMD_RATE = 0.25
GLAUCOMA_RATE = 0.3
# Per-channel transmission where a vessel fully covers the retina: veins darker than arteries.
ARTERY_FACTOR = np.array([0.8, 0.55, 0.55], np.float32)
VEIN_FACTOR = np.array([0.56, 0.3, 0.32], np.float32)
SURROUND_LEVEL = 3.0
SENSOR_NOISE = 1.5  # standard deviation in 8-bit levels


@dataclass
class CaseSpec:
    """What to draw.

    Attributes:
        laterality: "R" or "L".
        dr_grade: target DR grade 0-4; the drawn lesions grade to exactly this.
        amd: draw enough drusen for the AMD flag.
        cup_to_disc_ratio: vertical cup-to-disc ratio, 0.1-0.9 (>= 0.65 is glaucoma suspect).
        width, height: image size in pixels, each MIN_SIDE-MAX_SIDE, aspect at most MAX_ASPECT.
        seed: non-negative int; the same spec always gives the same image.
    """

    laterality: str
    dr_grade: int
    amd: bool
    cup_to_disc_ratio: float
    width: int = 1024
    height: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.laterality not in ("R", "L"):
            raise ValueError(f"laterality must be 'R' or 'L', got {self.laterality!r}")
        if isinstance(self.dr_grade, bool) or self.dr_grade not in range(5):
            raise ValueError(f"dr_grade must be an int 0-4, got {self.dr_grade!r}")
        if not 0.1 <= self.cup_to_disc_ratio <= 0.9:
            raise ValueError(f"cup_to_disc_ratio must be within 0.1-0.9, got {self.cup_to_disc_ratio}")
        for name, side in (("width", self.width), ("height", self.height)):
            if not isinstance(side, int) or not MIN_SIDE <= side <= MAX_SIDE:
                raise ValueError(f"{name} must be an int within {MIN_SIDE}-{MAX_SIDE} pixels, got {side!r}")
        if max(self.width, self.height) > MAX_ASPECT * min(self.width, self.height):
            raise ValueError(
                f"{self.width}x{self.height} is too elongated for a fundus photograph (aspect > {MAX_ASPECT})"
            )
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")


def random_case(seed: int, width: int | None = None, height: int | None = None) -> CaseSpec:
    """A case drawn from a balanced-ish mix of eyes, DR grades, AMD and glaucoma suspects.

    Args:
        seed: non-negative int; it picks the case and is also the drawing seed.
        width, height: image size; both None picks one of CAMERA_SIZES, one None makes it square.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    rng = np.random.default_rng(seed)
    laterality = "R" if rng.random() < 0.5 else "L"
    dr_grade = int(rng.choice(5, p=GRADE_WEIGHTS))
    amd = bool(rng.random() < AMD_RATE)
    # Keep clear of the 0.65 boundary so the glaucoma-suspect flag is unambiguous in the picture.
    cdr = rng.uniform(0.65, 0.85) if rng.random() < GLAUCOMA_RATE else rng.uniform(0.2, 0.55)
    if width is None and height is None:
        width, height = CAMERA_SIZES[int(rng.integers(len(CAMERA_SIZES)))]
    elif width is None or height is None:
        width = height = width if width is not None else height
    return CaseSpec(laterality, dr_grade, amd, round(float(cdr), 3), width, height, seed)


def draw_fundus(case: CaseSpec) -> tuple[np.ndarray, GroundTruth]:
    """Draw one colour fundus photograph.

    Returns:
        (image, truth): RGB uint8 array of shape (height, width, 3), and its GroundTruth.
    """
    anatomy_rng, vessel_rng, retina_rng, lesion_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(case.seed).spawn(4)
    )
    anatomy = layout_anatomy(case.width, case.height, case.laterality, case.cup_to_disc_ratio, anatomy_rng)
    grid = WorkGrid.for_anatomy(anatomy)
    vessels = grow_vessels(anatomy, vessel_rng)
    artery, vein = render_vessels(vessels, grid, anatomy.fov_radius)

    work = render_retina(anatomy, grid, retina_rng)
    work *= 1.0 - artery[..., None] * (1.0 - ARTERY_FACTOR)
    work *= 1.0 - vein[..., None] * (1.0 - VEIN_FACTOR)
    work += SENSOR_NOISE * retina_rng.standard_normal(work.shape, dtype=np.float32)
    cx, cy = anatomy.fov_center
    r = np.hypot(grid.xs[None, :] - cx, grid.ys[:, None] - cy)
    inside = np.clip((anatomy.fov_radius - r) / grid.pixel + 0.5, 0.0, 1.0)[..., None]
    work = SURROUND_LEVEL + inside * (work - SURROUND_LEVEL)
    small = np.clip(np.rint(work), 0, 255).astype(np.uint8)
    if (grid.width, grid.height) == (case.width, case.height):
        image = small
    else:
        resized = Image.fromarray(small, mode="RGB").resize((case.width, case.height), Image.Resampling.BICUBIC)
        image = np.array(resized)

    counts = plan_lesions(case.dr_grade, case.amd, lesion_rng)
    lesions = draw_lesions(image, anatomy, grid, np.maximum(artery, vein), vessels, counts, lesion_rng)
    truth = GroundTruth.from_lesions(
        laterality=case.laterality,
        cup_to_disc_ratio=case.cup_to_disc_ratio,
        disc_center=anatomy.disc_center,
        disc_radius=anatomy.disc_radius,
        fovea_center=anatomy.fovea_center,
        fov_center=anatomy.fov_center,
        fov_radius=anatomy.fov_radius,
        width=case.width,
        height=case.height,
        lesions=lesions,
    )
    return image, truth

"""Synthetic fundus generator: geometry and colour measured from the pixels, grading rules, ground truth."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fundusrt.synth.fundus import CaseSpec, draw_fundus, random_case
from fundusrt.synth.grading import (
    LESION_KINDS,
    GroundTruth,
    Lesion,
    amd_from_lesions,
    dr_grade_from_lesions,
    glaucoma_suspect_from_cdr,
)

DARK_KINDS = ("microaneurysm", "haemorrhage", "neovascularisation")
YELLOW_KINDS = ("hard_exudate", "drusen")


def luminance(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def radius_map(truth: GroundTruth, center: tuple[float, float]) -> np.ndarray:
    ys, xs = np.mgrid[0 : truth.height, 0 : truth.width]
    return np.hypot(xs - center[0], ys - center[1])


@pytest.fixture(scope="module")
def drawn() -> list[tuple[CaseSpec, np.ndarray, GroundTruth]]:
    """A varied set: random cases plus ones forced to hold every lesion kind, both eyes."""
    cases = [random_case(seed, 512, 512) for seed in range(12)]
    cases += [
        CaseSpec("R", 3, True, 0.4, 768, 512, seed=101),
        CaseSpec("L", 4, True, 0.7, 640, 640, seed=102),
        CaseSpec("L", 3, False, 0.3, 600, 900, seed=103),
        CaseSpec("R", 4, True, 0.5, 1024, 1024, seed=104),
    ]
    return [(case, *draw_fundus(case)) for case in cases]


def test_same_seed_same_bytes_other_seed_differs() -> None:
    case = random_case(5, 512, 512)
    image_a, truth_a = draw_fundus(case)
    image_b, truth_b = draw_fundus(random_case(5, 512, 512))
    assert image_a.tobytes() == image_b.tobytes()
    assert truth_a == truth_b
    other = CaseSpec(case.laterality, case.dr_grade, case.amd, case.cup_to_disc_ratio, 512, 512, seed=6)
    image_c, _ = draw_fundus(other)
    assert np.mean(image_a != image_c) > 0.5


@pytest.mark.parametrize("size", [(512, 512), (1440, 960), (768, 1024), (4288, 2848)])
def test_shape_dtype_and_fov_clipping(size: tuple[int, int]) -> None:
    width, height = size
    image, truth = draw_fundus(CaseSpec("L", 2, False, 0.5, width, height, seed=3))
    assert image.shape == (height, width, 3) and image.dtype == np.uint8
    assert (truth.width, truth.height) == size
    # Wide sensors crop the circle at the top and bottom: retina reaches both edges there.
    top_row_lit = luminance(image[:1]).max() > 40
    assert top_row_lit == (width / height >= 1.25), (size, truth.fov_radius)


def test_surround_dark_and_retina_reddish(drawn) -> None:
    for case, image, truth in drawn:
        r = radius_map(truth, truth.fov_center)
        outside = image[r > truth.fov_radius + 3]
        inside = image[r < 0.9 * truth.fov_radius].astype(np.float64)
        if outside.size:
            assert outside.mean() < 8 and outside.max() < 40, case
        red, green, blue = inside.mean(axis=0)
        assert red > green > blue and red > 100, (case, red, green, blue)


def test_disc_on_nasal_side_measured_from_pixels(drawn) -> None:
    """Right eye: disc on the viewer's right (macula to its left); left eye: the mirror image."""
    for case, image, truth in drawn:
        lum = luminance(image)
        block = max(4, int(truth.fov_radius / 6))
        h, w = (lum.shape[0] // block) * block, (lum.shape[1] // block) * block
        blocks = lum[:h, :w].reshape(h // block, block, w // block, block).mean(axis=(1, 3))
        row, col = np.unravel_index(np.argmax(blocks), blocks.shape)
        bright_x, bright_y = (col + 0.5) * block, (row + 0.5) * block
        on_right = bright_x > image.shape[1] / 2
        assert on_right == (case.laterality == "R"), case
        # The brightest block is the disc the ground truth names.
        assert math.hypot(bright_x - truth.disc_center[0], bright_y - truth.disc_center[1]) < 1.5 * block, case


def test_fovea_temporal_lower_and_dark(drawn) -> None:
    for case, image, truth in drawn:
        (dx, dy), (fx, fy) = truth.disc_center, truth.fovea_center
        temporal = -1 if case.laterality == "R" else 1
        disc_diameters = math.hypot(fx - dx, fy - dy) / (2 * truth.disc_radius)
        assert temporal * (fx - dx) > 0 and fy > dy and 2.2 < disc_diameters < 2.8, case
        lum = luminance(image)
        r = radius_map(truth, truth.fovea_center)
        centre = lum[r < 0.06 * truth.fov_radius].mean()
        around = lum[(r > 0.3 * truth.fov_radius) & (r < 0.4 * truth.fov_radius)].mean()
        assert centre < around, (case, centre, around)


def measured_cup_to_disc(image: np.ndarray, truth: GroundTruth) -> float:
    """Vertical cup extent / vertical disc extent, from a profile along the disc's vertical axis.

    Each row's profile value is the maximum over a narrow band around the axis, which looks past
    the vessels crossing the disc. The disc is where green rises half-way from the retina to the
    rim; the cup is where blue rises half-way from the rim to the cup's pallor.
    """
    (dx, dy), rd = truth.disc_center, truth.disc_radius
    band = image[:, int(dx - 0.3 * rd) : int(dx + 0.3 * rd) + 1].astype(np.float32)
    rows = np.arange(int(dy - 2 * rd), int(dy + 2 * rd))
    green, blue = band[rows, :, 1].max(axis=1), band[rows, :, 2].max(axis=1)
    ends = int(0.3 * rd)
    retina = np.median(np.r_[green[:ends], green[-ends:]])
    rim = np.median(green[np.abs(rows - dy) < 1.5 * rd])
    rim_blue = np.median(blue[np.abs(rows - dy) < 0.9 * rd][:5])

    def extent(profile: np.ndarray, threshold: float) -> int:
        above = np.nonzero(profile > threshold)[0]
        return int(above[-1] - above[0] + 1)

    return extent(blue, (rim_blue + blue.max()) / 2) / extent(green, (retina + rim) / 2)


@pytest.mark.parametrize("cdr", [0.3, 0.5, 0.8])
def test_cup_to_disc_ratio_measured_from_pixels(cdr: float) -> None:
    image, truth = draw_fundus(CaseSpec("R", 0, False, cdr, 1024, 1024, seed=11))
    assert measured_cup_to_disc(image, truth) == pytest.approx(cdr, abs=0.06)


def test_lesion_boxes_inside_image_fov_and_off_disc(drawn) -> None:
    for case, _, truth in drawn:
        for lesion in truth.lesions:
            x0, y0, x1, y1 = lesion.box
            assert 0 <= x0 < x1 <= truth.width and 0 <= y0 < y1 <= truth.height, (case, lesion)
            for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
                assert math.hypot(x - truth.fov_center[0], y - truth.fov_center[1]) <= truth.fov_radius, (case, lesion)
            assert x0 <= lesion.center[0] <= x1 and y0 <= lesion.center[1] <= y1, lesion
            nearest_x = min(max(truth.disc_center[0], x0), x1)
            nearest_y = min(max(truth.disc_center[1], y0), y1)
            gap = math.hypot(nearest_x - truth.disc_center[0], nearest_y - truth.disc_center[1])
            assert gap > truth.disc_radius, (case, lesion)


def lesion_contrast_problems(image: np.ndarray, truth: GroundTruth) -> list[str]:
    """Lesions whose box does not differ from the ring around it the way their kind should."""
    img = image.astype(np.float32)
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    problems = []
    for lesion in truth.lesions:
        x0, y0, x1, y1 = lesion.box
        m = max(2, (x1 - x0) // 2)
        ry0, rx0 = max(0, y0 - m), max(0, x0 - m)
        ring = np.ones((min(truth.height, y1 + m) - ry0, min(truth.width, x1 + m) - rx0), bool)
        ring[y0 - ry0 : y1 - ry0, x0 - rx0 : x1 - rx0] = False
        # Median: a vessel passing through the ring does not set the background.
        bg = np.median(img[ry0 : ry0 + ring.shape[0], rx0 : rx0 + ring.shape[1]][ring], axis=0)
        fg = img[y0:y1, x0:x1].reshape(-1, 3).mean(axis=0)
        if lesion.kind in DARK_KINDS:  # darker, and red: green falls, red stays above green
            ok = fg @ weights < bg @ weights - 3 and fg[1] < bg[1] and fg[0] > fg[1]
        elif lesion.kind in YELLOW_KINDS:  # brighter, and yellow: green rises more than blue
            ok = fg @ weights > bg @ weights + 3 and fg[1] - bg[1] > max(fg[2] - bg[2], 0)
        else:  # cotton-wool spot: brighter and paler (blue rises)
            ok = fg @ weights > bg @ weights + 3 and fg[2] > bg[2] + 3
        if not ok:
            problems.append(f"{lesion.kind} {lesion.box}: inside {fg.round()} around {bg.round()}")
    return problems


def test_lesions_differ_from_local_background(drawn) -> None:
    for case, image, truth in drawn:
        assert lesion_contrast_problems(image, truth) == [], case
    assert {lesion.kind for _, _, truth in drawn for lesion in truth.lesions} == set(LESION_KINDS)


def test_drawn_truth_matches_the_case(drawn) -> None:
    for case, _, truth in drawn:
        assert truth.laterality == case.laterality
        assert truth.dr_grade == case.dr_grade == dr_grade_from_lesions(truth.lesion_counts())
        assert truth.referable_dr == (case.dr_grade >= 2)
        assert truth.amd == case.amd
        assert truth.glaucoma_suspect == (case.cup_to_disc_ratio >= 0.65)


def test_random_cases_cover_grades_eyes_and_flags() -> None:
    cases = [random_case(seed) for seed in range(200)]
    assert {c.dr_grade for c in cases} == set(range(5))
    assert {c.laterality for c in cases} == {"R", "L"}
    assert {c.amd for c in cases} == {True, False}
    assert {c.cup_to_disc_ratio >= 0.65 for c in cases} == {True, False}
    assert len({(c.width, c.height) for c in cases}) > 1
    for grade in range(5):
        share = sum(c.dr_grade == grade for c in cases) / len(cases)
        assert 0.08 < share < 0.45, (grade, share)


@pytest.mark.parametrize(
    ("counts", "grade"),
    [
        ({}, 0),
        ({"drusen": 30}, 0),
        ({"microaneurysm": 1}, 1),
        ({"microaneurysm": 60, "drusen": 12}, 1),
        ({"microaneurysm": 3, "haemorrhage": 1}, 2),
        ({"hard_exudate": 1}, 2),
        ({"cotton_wool_spot": 1}, 2),
        ({"haemorrhage": 19, "hard_exudate": 30, "cotton_wool_spot": 5}, 2),
        ({"haemorrhage": 20}, 3),
        ({"neovascularisation": 1}, 4),
        ({"neovascularisation": 2, "haemorrhage": 40, "microaneurysm": 9}, 4),
    ],
)
def test_dr_grade_rules(counts: dict[str, int], grade: int) -> None:
    assert dr_grade_from_lesions(counts) == grade


def test_grading_thresholds_and_bad_counts() -> None:
    assert dr_grade_from_lesions({"haemorrhage": 10}, severe_haemorrhages=10) == 3
    assert not amd_from_lesions({"drusen": 7}) and amd_from_lesions({"drusen": 8})
    assert not glaucoma_suspect_from_cdr(0.64) and glaucoma_suspect_from_cdr(0.65)
    with pytest.raises(ValueError, match="unknown lesion kind 'naevus'"):
        dr_grade_from_lesions({"naevus": 1})
    with pytest.raises(ValueError, match="non-negative"):
        dr_grade_from_lesions({"haemorrhage": -1})


def test_ground_truth_json_round_trip(drawn) -> None:
    for _, _, truth in drawn:
        text = json.dumps(truth.to_dict())
        back = GroundTruth.from_dict(json.loads(text))
        assert back == truth
        assert isinstance(back.disc_center, tuple) and all(isinstance(lesion.box, tuple) for lesion in back.lesions)


def test_ground_truth_rejects_bad_input() -> None:
    _, truth = draw_fundus(CaseSpec("R", 1, False, 0.4, 512, 512, seed=2))
    d = truth.to_dict()
    del d["fovea_center"]
    with pytest.raises(ValueError, match="fovea_center"):
        GroundTruth.from_dict(d)
    with pytest.raises(ValueError, match="referable_dr"):
        GroundTruth.from_dict({**truth.to_dict(), "referable_dr": True})
    with pytest.raises(ValueError, match="unknown lesion kind"):
        Lesion("naevus", (0, 0, 2, 2), (1.0, 1.0))
    with pytest.raises(ValueError, match="empty"):
        Lesion("drusen", (5, 5, 5, 9), (5.0, 7.0))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"laterality": "OD"}, "laterality"),
        ({"dr_grade": 5}, "dr_grade"),
        ({"cup_to_disc_ratio": 0.95}, "cup_to_disc_ratio"),
        ({"width": 100}, "width"),
        ({"width": 2048, "height": 512}, "elongated"),
        ({"seed": -1}, "seed"),
    ],
)
def test_case_spec_validation(kwargs: dict, message: str) -> None:
    spec = dict(laterality="R", dr_grade=0, amd=False, cup_to_disc_ratio=0.4, width=512, height=512, seed=0)
    with pytest.raises(ValueError, match=message):
        CaseSpec(**{**spec, **kwargs})


def test_anatomy_scales_with_the_field_of_view() -> None:
    """One seed at two sizes: the same eye, in units of the FOV radius."""
    _, small = draw_fundus(CaseSpec("L", 0, False, 0.5, 512, 512, seed=9))
    _, large = draw_fundus(CaseSpec("L", 0, False, 0.5, 1536, 1536, seed=9))

    def normalised(t: GroundTruth) -> list[float]:
        (cx, cy), r = t.fov_center, t.fov_radius
        return [(t.disc_center[0] - cx) / r, (t.disc_center[1] - cy) / r, t.disc_radius / r,
                (t.fovea_center[0] - cx) / r, (t.fovea_center[1] - cy) / r]

    assert np.allclose(normalised(small), normalised(large), atol=1e-9)

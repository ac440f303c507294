"""The gradability gate on a real photograph (tests/data, CC0), its degraded versions and synthetic pictures.

Each degraded version is made from the real photograph in one known way, so the reason the gate gives
must be that one; the clean photograph and everything `fundusrt.synth` draws must pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from _real_fundus import left_eye, on_canvas, right_eye
from fundusrt.dicom.gradability import (
    MAX_SATURATED_SHARE,
    MIN_CONTRAST,
    MIN_COVERAGE,
    MIN_MEAN_LUMA,
    MIN_SHARPNESS,
    assess_gradability,
)


def scaled(gain: float, offset: float = 0.0) -> np.ndarray:
    return np.clip(left_eye().astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)


def blurred(sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(left_eye()).filter(ImageFilter.GaussianBlur(sigma)))


# (name, picture, the reason's first word, the measure that fails, its threshold)
DEGRADED = {
    "too-dark": (lambda: scaled(0.15), "underexposed", "mean_luma", MIN_MEAN_LUMA),
    "burnt-out": (lambda: scaled(4.0), "overexposed", "saturated_share", MAX_SATURATED_SHARE),
    "hazy": (lambda: scaled(0.4, 120), "low contrast", "contrast", MIN_CONTRAST),
    "defocused": (lambda: blurred(4), "out of focus", "sharpness", MIN_SHARPNESS),
    # the camera aimed off: only the right 40% of the field is inside the frame
    "mostly-out-of-field": (lambda: on_canvas(left_eye()[:, 600:], 1024, 1024, 0, 0), "field not covered",
                            "coverage", MIN_COVERAGE),
}


@pytest.mark.parametrize("make", [left_eye, right_eye], ids=["photo", "mirrored"])
def test_the_real_photograph_is_gradable(make) -> None:
    verdict = assess_gradability(make())
    assert verdict.gradable and verdict.reasons == [], verdict


@pytest.mark.parametrize("name", DEGRADED)
def test_a_degraded_photograph_is_ungradable_with_the_right_reason(name: str) -> None:
    make, reason, measure, threshold = DEGRADED[name]
    verdict = assess_gradability(make())
    assert not verdict.gradable
    assert any(r.startswith(reason) for r in verdict.reasons), verdict.reasons
    # the measure crossed its threshold on the failing side, and it did not on the clean photograph
    clean = assess_gradability(left_eye()).measures[measure]
    failed = verdict.measures[measure]
    if measure == "saturated_share":
        assert failed > threshold >= clean
    else:
        assert failed < threshold <= clean


def test_mild_degradations_stay_gradable() -> None:
    # a dimmer exposure, a field cut at top and bottom by a wide sensor and a smaller picture are still gradable
    for image in (scaled(0.3), on_canvas(left_eye()[150:874], 1536, 724, 256, 0),
                  np.asarray(Image.fromarray(left_eye()).resize((384, 384), Image.BICUBIC))):
        verdict = assess_gradability(image)
        assert verdict.gradable, verdict


@pytest.mark.parametrize(("image", "reason"), [(np.zeros((200, 300, 3), np.uint8), "no field of view"),
                                               (np.full((200, 300, 3), 255, np.uint8), "overexposed")],
                         ids=["black", "white"])
def test_no_field_of_view(image: np.ndarray, reason: str) -> None:
    verdict = assess_gradability(image)
    assert not verdict.gradable and verdict.reasons[0].startswith(reason)


def test_synthetic_pictures_pass_the_gate() -> None:
    from fundusrt.synth import draw_fundus, random_case

    for seed in range(12):
        for size in ((None, None), (384, 384), (480, 320), (1600, 1200)):
            verdict = assess_gradability(draw_fundus(random_case(seed, *size))[0])
            assert verdict.gradable, (seed, size, verdict)


def test_dark_image_is_reported_ungradable_and_not_shown_to_the_model(tmp_path: Path, tiny_package) -> None:
    from test_real_photos import write_photo

    from fundusrt.cli import main

    _, package = tiny_package("siglip-dense", seed=0)
    study = tmp_path / "study"
    study.mkdir()
    write_photo(study / "right.dcm", right_eye(), "R")
    write_photo(study / "left-dark.dcm", scaled(0.15), "L")
    out = tmp_path / "findings.json"
    assert main(["run", str(study), "--package", str(package), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    by_eye = {i["laterality"]: i for i in report["images"]}
    assert by_eye["R"]["gradable"] and by_eye["R"]["answers"]
    dark = by_eye["L"]
    assert not dark["gradable"] and dark["answers"] == []
    assert dark["gradability_reasons"][0].startswith("underexposed")
    assert report["eyes"]["L"]["gradable"] is False and report["eyes"]["R"]["gradable"] is True


# the reason each synthetic defect must be rejected for; an eyelid hanging into the field leaves exposure,
# contrast, focus and field size normal, so it is left to the model's gradability item
DEFECT_REASONS = {"underexposed": "underexposed", "overexposed": "overexposed", "defocused": "out of focus",
                  "vignetted": "small field", "off_centre": "field not covered"}
MODEL_ONLY_DEFECTS = ("eyelid",)


@pytest.mark.parametrize("defect", list(DEFECT_REASONS))
def test_synthetic_defects_are_caught_with_their_reason(defect: str) -> None:
    from fundusrt.synth import draw_fundus, random_case
    from fundusrt.synth.quality import DEFECTS, apply_defect

    assert set(DEFECTS) == set(DEFECT_REASONS) | set(MODEL_ONLY_DEFECTS)
    for seed in range(6):
        clean = draw_fundus(random_case(seed, 384 + 32 * seed, 384))[0]
        verdict = assess_gradability(apply_defect(clean, defect, seed))
        assert not verdict.gradable and verdict.reasons[0].startswith(DEFECT_REASONS[defect]), (seed, verdict)


def test_gate_figures_on_synthetic_cases(capsys) -> None:
    from fundusrt.cli import main
    from fundusrt.synth.quality import UNGRADABLE_RATE, defect_for

    drawn = [defect_for(seed) for seed in range(4000)]
    assert abs(sum(d is not None for d in drawn) / len(drawn) - UNGRADABLE_RATE) < 0.02
    # seeds 0-39 hold these defects: the gate must catch each and pass the rest
    assert main(["protocol", "gate", "--count", "40", "--first-seed", "0"]) == 0
    figures = json.loads(capsys.readouterr().out)
    drawn = [defect_for(seed) for seed in range(40)]
    ungradable = sum(d is not None for d in drawn)
    pixel_visible = sum(d is not None and d not in MODEL_ONLY_DEFECTS for d in drawn)
    assert pixel_visible < ungradable and figures["sensitivity"]["n"] == ungradable
    assert figures["sensitivity"]["k"] == pixel_visible and figures["specificity"]["value"] == 1.0
    assert figures["defects"]["eyelid"]["refused"] == 0

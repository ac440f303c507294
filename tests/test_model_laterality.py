"""An image with neither a laterality tag nor a confident picture reading goes to the eye the model answers.

Through the shipped demo package and the real pipeline, on synthetic fundus pictures whose optic disc is
faded into its surround until the picture check (`fundusrt/dicom/laterality.py`) cannot call the side,
while the model, which reads the vessels and macula too, still can.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from fundusrt.dicom.laterality import check_laterality, image_laterality
from fundusrt.runtime.pipeline import Pipeline
from fundusrt.runtime.protocol import (
    DEFAULT_PROTOCOL,
    MODEL_LATERALITY_MIN_PROBABILITY,
    model_laterality,
    parse_protocol,
)
from fundusrt.runtime.report import StudyReport
from fundusrt.synth.dicom_writer import write_op_image
from fundusrt.synth.fundus import draw_fundus, random_case

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
# (seed of the drawn case, how far its disc is faded): measured with the demo package, the first two are
# read by the model at P >= 0.99 but not by the picture check, the third leaves the model unsure
RIGHT_EYE, LEFT_EYE, UNSURE = (2, 0.8), (1, 0.7), (2, 0.9)


def faded_disc(seed: int, fade: float) -> tuple[np.ndarray, str]:
    """A drawn fundus (512 px) with its disc blended `fade` of the way into its surround, and its eye."""
    case = random_case(seed, 512, 512)
    image, truth = draw_fundus(case)
    (x, y), radius = truth.disc_center, truth.disc_radius
    yy, xx = np.mgrid[: image.shape[0], : image.shape[1]]
    distance = np.hypot(xx - x, yy - y)
    disc = distance <= 1.8 * radius
    surround = np.median(image[(distance > 1.8 * radius) & (distance < 4.5 * radius)], axis=0)
    out = image.astype(np.float32)
    out[disc] = (1 - fade) * out[disc] + fade * surround
    return out.astype(np.uint8), case.laterality


def write(path: Path, pixels: np.ndarray, tag: str | None, study_uid: str) -> Path:
    """Ophthalmic Photography DICOM (uncompressed, so the pixels are the ones drawn), without a tag for None."""
    write_op_image(path, pixels, laterality=tag or "R", study_instance_uid=study_uid)
    if tag is None:
        ds = pydicom.dcmread(path)
        for keyword in ("ImageLaterality", "Laterality"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    from fundusrt.export import export_package
    from fundusrt.runtime.pipeline import load_package

    package = export_package(DEMO, tmp_path_factory.mktemp("demo") / "pkg", max_seq_len=512)
    return load_package(package, "ort-cpu", threads=2)


@pytest.fixture(scope="module")
def pictures() -> dict[str, tuple[np.ndarray, str]]:
    return {"right": faded_disc(*RIGHT_EYE), "left": faded_disc(*LEFT_EYE), "unsure": faded_disc(*UNSURE)}


@pytest.fixture(scope="module")
def study(pipe: Pipeline, pictures: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyReport, dict]:
    """One study: the right and left pictures untagged, the right picture tagged L, the unsure one untagged."""
    folder = tmp_path_factory.mktemp("study")
    uid = generate_uid()
    files = {"right.dcm": ("right", None), "left.dcm": ("left", None), "tagged.dcm": ("right", "L"),
             "unsure.dcm": ("unsure", None)}
    for name, (picture, tag) in files.items():
        write(folder / name, pictures[picture][0], tag, uid)
    report = pipe.run_study(folder)
    assert not report.errors, report.errors
    return report, {Path(i.source).name: i for i in report.images}


def p_eye(pipe: Pipeline, pixels: np.ndarray) -> dict[str, float]:
    """The model's laterality probabilities for a picture, scored on its own."""
    probs = pipe.score(pixels)["laterality"].probabilities
    return {"R": probs["Right"], "L": probs["Left"]}


def test_the_pictures_are_what_the_tests_need(pipe: Pipeline, pictures: dict) -> None:
    # the picture check cannot call any of them; the model is sure of two, not of the third
    for name, (pixels, _) in pictures.items():
        assert check_laterality(None, image_laterality(pixels)).laterality is None, name
    for name in ("right", "left"):
        assert max(p_eye(pipe, pictures[name][0]).values()) >= MODEL_LATERALITY_MIN_PROBABILITY, name
    assert 0.5 < max(p_eye(pipe, pictures["unsure"][0]).values()) < MODEL_LATERALITY_MIN_PROBABILITY


def test_untagged_unreadable_pictures_go_to_the_eye_the_model_answers(pipe: Pipeline, pictures: dict,
                                                                      study: tuple) -> None:
    report, by_file = study
    for name in ("right", "left"):
        image, (pixels, drawn_eye) = by_file[f"{name}.dcm"], pictures[name]
        expected = p_eye(pipe, pixels)
        assert (image.laterality, image.laterality_source, image.laterality_mismatch) == (drawn_eye, "model", False)
        assert image.image_laterality_confidence < 0.5 and image.gradable
        assert image.model_laterality_probability == pytest.approx(expected[drawn_eye], abs=1e-6)
    eyes = report.eyes()
    assert eyes["R"]["images"] == [by_file["right.dcm"].sop_instance_uid]
    assert sorted(eyes["L"]["images"]) == sorted(by_file[n].sop_instance_uid for n in ("left.dcm", "tagged.dcm"))
    # the per-eye screening aggregates the model-placed image in its eye
    assert eyes["R"]["items"]["laterality"]["answer"] == "Right" and eyes["R"]["decision"] in ("refer", "no_refer")
    text = report.render_text()
    right = by_file["right.dcm"]
    assert (f"Note: image {right.sop_instance_uid} has no laterality tag and the picture check could not tell "
            f"the eye; R was read by the model (probability {right.model_laterality_probability:.3f})") in text
    saved = json.loads(json.dumps(report.to_dict()))
    entry = next(i for i in saved["images"] if i["sop_instance_uid"] == right.sop_instance_uid)
    assert (entry["laterality"], entry["laterality_source"]) == ("R", "model")


def test_a_tag_wins_over_the_model(study: tuple) -> None:
    _, by_file = study
    tagged = by_file["tagged.dcm"]
    assert tagged.items["laterality"]["answer"] == "Right"  # the model says the other eye, and is sure of it
    assert (tagged.laterality, tagged.laterality_source, tagged.model_laterality_probability) == ("L", "tag", None)


def test_below_the_threshold_the_eye_stays_unknown(study: tuple) -> None:
    report, by_file = study
    unsure = by_file["unsure.dcm"]
    assert (unsure.laterality, unsure.laterality_source, unsure.model_laterality_probability) == (None, "image", None)
    assert report.eyes()["unknown"]["images"] == [unsure.sop_instance_uid]
    assert f"image {unsure.sop_instance_uid} has no laterality tag" not in report.render_text()


def _protocol_with_laterality_options(options: list[dict[str, Any]]):
    data = json.loads(DEFAULT_PROTOCOL.read_text())
    next(i for i in data["items"] if i["role"] == "laterality")["options"] = options
    return parse_protocol(data)


def _scored(protocol, probs: dict[str, float]) -> dict[str, Any]:
    item = next(i for i in protocol.items if i.role == "laterality")
    return {item.id: {"probabilities": probs}}


def test_options_are_read_as_eyes_by_their_codes_not_their_text() -> None:
    # a protocol that answers "OS"/"OD" and codes the eye structures: the codes say which is which
    protocol = _protocol_with_laterality_options([
        {"answer": "OS", "code": {"value": "8966001", "scheme": "SCT", "meaning": "Left eye structure"}},
        {"answer": "OD", "code": {"value": "18944008", "scheme": "SCT", "meaning": "Right eye structure"}},
    ])
    assert model_laterality(protocol, _scored(protocol, {"OS": 0.995, "OD": 0.005})) == ("L", 0.995)
    assert model_laterality(protocol, _scored(protocol, {"OS": 0.02, "OD": 0.98})) is None  # below 0.99
    # options whose codes name no eye place nothing, whatever their text says
    private = _protocol_with_laterality_options([
        {"answer": "Right", "code": {"value": "od", "scheme": "99FUNDUSRT", "meaning": "Right"}},
        {"answer": "Left", "code": {"value": "os", "scheme": "99FUNDUSRT", "meaning": "Left"}},
    ])
    assert model_laterality(private, _scored(private, {"Right": 1.0, "Left": 0.0})) is None
    # not scored (an ungradable image) or no laterality item: nothing
    assert model_laterality(protocol, {}) is None

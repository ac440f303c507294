"""The protocol's gradability item, answered by the demo model, catches what the pixel checks cannot.

An upper eyelid hanging into the field (`fundusrt.synth.quality`, "eyelid") leaves exposure, contrast,
focus and field size normal, so the pixel checks pass it; the shipped protocol's `gradable` item, which
the demo model was taught, must still make such a picture ungradable, and an eye with only that
picture must be reported "ungradable", never "no_refer".
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fundusrt.cli import main
from fundusrt.dicom.gradability import assess_gradability
from fundusrt.synth.dicom_writer import write_op_image
from fundusrt.synth.fundus import draw_fundus, random_case
from fundusrt.synth.quality import apply_defect, defect_for

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fundusrt.export import export_package

    return export_package(DEMO, tmp_path_factory.mktemp("demo") / "pkg", max_seq_len=512)


def test_gate_figures_with_the_models_item(package: Path, capsys) -> None:
    count = 100
    eyelids = [seed for seed in range(count) if defect_for(seed) == "eyelid"]
    assert len(eyelids) >= 4
    assert main(["protocol", "gate", "--count", str(count), "--first-seed", "0", "--package", str(package),
                 "--threads", "2"]) == 0
    figures = json.loads(capsys.readouterr().out)
    eyelid = figures["defects"]["eyelid"]
    assert eyelid["cases"] == len(eyelids) and eyelid["refused"] == 0  # the pixels pass every one
    assert eyelid["refused_by_pixels_or_model"] == len(eyelids)
    assert figures["model_item"]["item"] == "gradable"
    gate = figures["pixels_then_model"]
    assert gate["sensitivity"]["value"] == 1.0 and gate["specificity"]["value"] >= 0.97, gate


def test_an_eye_with_only_an_eyelid_picture_is_ungradable(package: Path, tmp_path: Path) -> None:
    seed = 14  # drawn with an eyelid by defect_for; the same picture without it is the right eye here
    image, _ = draw_fundus(random_case(seed, 512, 512))
    covered = apply_defect(image, "eyelid", seed)
    assert assess_gradability(covered).gradable  # what the pixels cannot see
    study = tmp_path / "study"
    study.mkdir()
    uid = "1.2.826.0.1.3680043.8.498.77"
    write_op_image(study / "right.dcm", image, laterality="R", study_instance_uid=uid)
    write_op_image(study / "left.dcm", covered, laterality="L", study_instance_uid=uid)
    out = tmp_path / "findings.json"
    assert main(["run", str(study), "--package", str(package), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    left, right = report["eyes"]["L"], report["eyes"]["R"]
    assert left["decision"] == "ungradable" and left["gradable"] is False
    assert any("model: P(gradable)" in reason for reason in left["gradability_reasons"]), left
    assert right["gradable"] is True and right["decision"] in ("refer", "no_refer")
    assert report["screening"]["protocol"]["version"] == "1.1"

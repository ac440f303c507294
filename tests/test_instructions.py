"""Synthetic instruction data: answers follow the ground truth, boxes are InternVL 0-999, files parse."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from fundusrt.synth.fundus import draw_fundus, random_case
from fundusrt.synth.grading import DR_GRADE_NAMES, GroundTruth, Lesion
from fundusrt.synth.instructions import (
    CLOSED_TYPES,
    NONE_FOUND,
    QUESTION_TYPES,
    QUESTIONS,
    SMALL_SIZES,
    check_types,
    expected_answer,
    grounding_qa,
    mirror_truth,
    normalise_box,
    parse_closed_answer,
    questions_for,
    records_from_truths,
    structured_report,
    write_instructions,
)
from fundusrt.training.records import Record, check_boxes, read_records


def _truth(**overrides) -> GroundTruth:
    lesions = overrides.pop("lesions", [])
    base = {"laterality": "L", "cup_to_disc_ratio": 0.7, "disc_center": (100.0, 200.0), "disc_radius": 20.0,
                "fovea_center": (250.0, 210.0), "fov_center": (200.0, 200.0), "fov_radius": 190.0, "width": 400, "height": 400}
    base.update(overrides)
    return GroundTruth.from_lesions(lesions=lesions, **base)


def test_normalise_box_matches_the_internvl_formula() -> None:
    # x' = floor(x * 1000 / width), inclusive right/bottom edges, clipped to 999
    assert normalise_box((0, 0, 400, 300), 400, 300) == (0, 0, 997, 996)
    assert normalise_box((100, 30, 101, 31), 400, 300) == (250, 100, 250, 100)
    assert normalise_box((-5, -5, 900, 900), 400, 300) == (0, 0, 999, 999)


def test_closed_answers_follow_the_ground_truth() -> None:
    truth = _truth(lesions=[Lesion("haemorrhage", (300, 300, 306, 305), (303.0, 302.0))] +
                   [Lesion("drusen", (240 + 4 * i, 200, 242 + 4 * i, 202), (241.0 + 4 * i, 201.0)) for i in range(9)])
    assert truth.dr_grade == 2 and truth.amd and truth.glaucoma_suspect
    assert [expected_answer(t, truth) for t in CLOSED_TYPES] == ["Left", "Yes", "C", "Yes", "Yes", "Yes"]
    healthy = _truth(laterality="R", cup_to_disc_ratio=0.3)
    assert [expected_answer(t, healthy) for t in CLOSED_TYPES] == ["Right", "No", "A", "No", "No", "Yes"]
    assert expected_answer("gradable", dataclasses.replace(healthy, defect="eyelid")) == "No"


def test_grounding_boxes_cover_the_lesions_in_0_999() -> None:
    _image, truth = draw_fundus(random_case(11, 480, 320))
    kinds = {les.kind for les in truth.lesions}
    assert kinds, "seed 11 should draw lesions"
    for kind in kinds:
        qa = grounding_qa(truth, kind)
        label = re.fullmatch(r"<ref>(.*?)</ref><box>(.*)</box>", qa.answer)
        assert label and label.group(1) == kind.replace("_", " ")
        assert check_boxes(qa.answer) is None
        boxes = json.loads(label.group(2))
        centres = [les.center for les in truth.lesions if les.kind == kind]
        assert len(boxes) == min(8, len(centres))
        for x0, y0, x1, y1 in boxes:
            # each box holds at least one lesion centre of that kind, in normalised coordinates
            assert any(x0 <= cx * 1000 / truth.width + 1 and cx * 1000 / truth.width - 1 <= x1 and
                       y0 <= cy * 1000 / truth.height + 1 and cy * 1000 / truth.height - 1 <= y1
                       for cx, cy in centres)
    assert grounding_qa(_truth(), "haemorrhage").answer == NONE_FOUND
    disc = grounding_qa(truth, "optic disc").answer
    (x0, y0, x1, y1), = json.loads(re.search(r"<box>(.*)</box>", disc).group(1))
    cx, cy = truth.disc_center
    assert x0 < cx * 1000 / truth.width < x1 and y0 < cy * 1000 / truth.height < y1


def test_report_names_eye_findings_and_impression() -> None:
    truth = _truth(lesions=[Lesion("hard_exudate", (300, 300, 304, 304), (302.0, 302.0))])
    report = structured_report(truth)
    lines = report.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Examination", "Findings", "Impression"]
    assert "left eye" in lines[0]
    assert "hard exudates" in lines[1] and "0.7" in lines[1] and "haemorrhages" not in lines[1]
    assert DR_GRADE_NAMES[2] in lines[2] and "referable" in lines[2] and "glaucoma suspect" in lines[2]


@pytest.mark.parametrize(("qtype", "text", "parsed"), [
    ("laterality", " right eye.", "Right"), ("referable_dr", "Yes, moderate", "Yes"), ("amd", "no", "No"),
    ("dr_grade", "C) moderate", "C"), ("dr_grade", "F", None), ("cdr_large", "", None), ("amd", "maybe", None),
])
def test_parse_closed_answer(qtype: str, text: str, parsed: str | None) -> None:
    assert parse_closed_answer(qtype, text) == parsed


def test_unknown_types_are_rejected() -> None:
    with pytest.raises(ValueError, match="question types"):
        check_types(["laterality", "colour"])
    with pytest.raises(ValueError, match="not a closed question"):
        parse_closed_answer("report", "Yes")


def test_questions_cover_each_type_once_in_seeded_order() -> None:
    truth = _truth()
    a = questions_for(truth, CLOSED_TYPES, np.random.default_rng(3))
    b = questions_for(truth, CLOSED_TYPES, np.random.default_rng(3))
    assert a == b and sorted(qa.type for qa in a) == sorted(CLOSED_TYPES)
    assert all(qa.question == QUESTIONS[qa.type] for qa in a)


def test_one_question_records_split_the_conversation_in_order() -> None:
    truth = _truth()
    (whole,) = records_from_truths([(4, False, truth)], CLOSED_TYPES)
    split = records_from_truths([(4, False, truth)], CLOSED_TYPES, one_question=True)
    assert [r["id"] for r in split] == [f"{whole['id']}-{k}" for k in range(len(CLOSED_TYPES))]
    assert all(r["image"] == whole["image"] and len(r["conversations"]) == 2 for r in split)
    questions = [t["value"].replace("<image>\n", "") for t in whole["conversations"][::2]]
    assert [r["conversations"][0]["value"] for r in split] == ["<image>\n" + q for q in questions]
    assert [r["conversations"][1] for r in split] == whole["conversations"][1::2]


@pytest.mark.parametrize("fmt", ["llava", "internvl"])
def test_written_files_parse_and_match_the_drawn_truth(tmp_path, fmt: str) -> None:
    path = write_instructions(tmp_path / fmt, count=3, seed_start=40, fmt=fmt)
    records = list(read_records(path))
    assert all(isinstance(r, Record) for r in records), records
    assert len(records) == 3
    for seed, record in zip(range(40, 43), records, strict=True):
        _, truth = draw_fundus(random_case(seed, record.extra["width"], record.extra["height"]))
        assert GroundTruth.from_dict(record.extra["fundusrt"]["truth"]) == truth
        types = record.extra["fundusrt"]["types"]
        assert sorted(types) == sorted(QUESTION_TYPES) and len(record.turns) == len(QUESTION_TYPES)
        for qtype, (_, answer) in zip(types, record.turns, strict=True):
            if qtype in CLOSED_TYPES + ("report",):
                assert answer == expected_answer(qtype, truth)
        assert record.turns[0][0].startswith("<image>\n")
        from PIL import Image

        with Image.open(record.images[0]) as image:
            assert image.size == (truth.width, truth.height)
    again = write_instructions(tmp_path / "again", count=3, seed_start=40, fmt=fmt)
    assert again.read_text() == path.read_text()


def test_ungradable_cases_carry_their_defect_and_are_asked_only_about_quality(tmp_path) -> None:
    from PIL import Image

    from fundusrt.synth.quality import apply_defect, defect_for

    seeds = [s for s in range(40) if defect_for(s, 0.5)][:2] + [s for s in range(40) if not defect_for(s, 0.5)][:1]
    for seed in seeds:
        path = write_instructions(tmp_path / str(seed), count=1, seed_start=seed, types=CLOSED_TYPES, mirror=True,
                                  ungradable_rate=0.5)
        records = json.loads(path.read_text())
        defect = defect_for(seed, 0.5)
        image, _ = draw_fundus(random_case(seed, *SMALL_SIZES[seed % len(SMALL_SIZES)]))
        for record, pixels in zip(records, (image, image[:, ::-1]), strict=True):
            truth = GroundTruth.from_dict(record["fundusrt"]["truth"])
            assert truth.defect == defect
            written = np.asarray(Image.open(path.parent / record["image"]))
            expected = pixels if defect is None else apply_defect(np.ascontiguousarray(pixels), defect, seed)
            np.testing.assert_array_equal(written, expected)
            asked = dict(zip(record["fundusrt"]["types"], record["conversations"][1::2], strict=True))
            if defect is None:
                assert sorted(asked) == sorted(CLOSED_TYPES) and asked["gradable"]["value"] == "Yes"
            else:
                assert list(asked) == ["gradable"] and asked["gradable"]["value"] == "No"
    seed = seeds[-1]
    path = write_instructions(tmp_path / "dim", count=1, seed_start=seed, types=CLOSED_TYPES, exposure_gain=(0.5, 0.5))
    image, _ = draw_fundus(random_case(seed, *SMALL_SIZES[seed % len(SMALL_SIZES)]))
    (record,) = json.loads(path.read_text())
    np.testing.assert_array_equal(np.asarray(Image.open(path.parent / record["image"])),
                                  (image.astype(np.float32) * 0.5).astype(np.uint8))
    with pytest.raises(ValueError, match="ungradable_rate"):
        write_instructions(tmp_path / "bad", count=1, ungradable_rate=1.5)
    with pytest.raises(ValueError, match="exposure_gain"):
        write_instructions(tmp_path / "bad", count=1, exposure_gain=(1.2, 0.8))


def test_mirrored_truth_describes_the_flipped_image() -> None:
    image, truth = draw_fundus(random_case(12, 432, 288))
    flipped, mirrored = image[:, ::-1], mirror_truth(truth)
    assert mirrored.laterality != truth.laterality
    assert (mirrored.dr_grade, mirrored.amd, mirrored.glaucoma_suspect) == (truth.dr_grade, truth.amd,
                                                                             truth.glaucoma_suspect)
    assert mirrored.disc_center == (truth.width - truth.disc_center[0], truth.disc_center[1])
    for original, moved in zip(truth.lesions, mirrored.lesions, strict=True):
        (x0, y0, x1, y1), (m0, n0, m1, n1) = original.box, moved.box
        np.testing.assert_array_equal(flipped[n0:n1, m0:m1], image[y0:y1, x0:x1][:, ::-1])
    twice = mirror_truth(mirrored)
    assert twice.laterality == truth.laterality and [les.box for les in twice.lesions] == [les.box for les in truth.lesions]


def test_mirror_option_writes_flipped_fellow_eyes(tmp_path) -> None:
    from PIL import Image

    path = write_instructions(tmp_path, count=1, seed_start=3, types=CLOSED_TYPES, mirror=True)
    first, second = json.loads(path.read_text())
    assert (first["id"], second["id"]) == ("synth-0000003", "synth-0000003-m")
    pixels = [np.asarray(Image.open(tmp_path / r["image"])) for r in (first, second)]
    np.testing.assert_array_equal(pixels[1], pixels[0][:, ::-1])
    answers = [{t: turn["value"] for t, turn in zip(r["fundusrt"]["types"], r["conversations"][1::2], strict=True)}
               for r in (first, second)]
    assert {answers[0]["laterality"], answers[1]["laterality"]} == {"Right", "Left"}
    assert all(answers[0][t] == answers[1][t] for t in CLOSED_TYPES if t != "laterality")

"""Screening protocols: the shipped default against the synthetic generator, validation, aggregation and referral."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from fundusrt.manifest import Manifest
from fundusrt.runtime.protocol import (
    DEFAULT_PROTOCOL,
    FORMAT_VERSION,
    ProtocolError,
    load_protocol,
    option_token_ids,
    parse_protocol,
    patient_decision,
    screen_eye,
)
from fundusrt.synth.instructions import CLOSED_TYPES, GRADE_LETTERS, QUESTIONS


def default_data() -> dict[str, Any]:
    return json.loads(DEFAULT_PROTOCOL.read_text())


def test_default_protocol_is_what_the_synthetic_generator_asks() -> None:
    protocol = load_protocol(DEFAULT_PROTOCOL)
    assert [i.id for i in protocol.items] == list(CLOSED_TYPES)
    for item in protocol.items:
        assert item.question == QUESTIONS[item.id]
    assert protocol.item("dr_grade").answers == list(GRADE_LETTERS)
    assert protocol.item("laterality").answers == ["Right", "Left"]
    assert len(protocol.sha256) == 64


def refused(data: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        parse_protocol(data)


def test_unknown_code_scheme_is_refused() -> None:
    data = default_data()
    data["items"][1]["options"][0]["code"]["scheme"] = "ICD99"
    refused(data, r"unknown code scheme 'ICD99'.*99FUNDUSRT")


@pytest.mark.parametrize("second", ["Yes", "yes", "Yes please"], ids=["exact", "case", "prefix"])
def test_duplicate_option_is_refused(second: str) -> None:
    data = default_data()
    data["items"][1]["options"][1]["answer"] = second
    refused(data, "duplicate option 'Yes'")


@pytest.mark.parametrize(("version", "match"), [(FORMAT_VERSION + 1, "newer than this fundusrt reads"),
                                                (0, "older than this fundusrt reads"), ("1", "newer")])
def test_format_versions_outside_the_readable_range_are_refused(version: Any, match: str) -> None:
    data = default_data()
    data["format_version"] = version
    refused(data, match)


def test_other_rules() -> None:
    data = default_data()
    del data["format"]
    refused(data, "not a screening protocol")
    data = default_data()
    data["items"][3]["positive"] = ["Maybe"]
    refused(data, "'amd'.*positive")
    data = default_data()
    data["referral"]["item"] = "laterality"
    refused(data, "referral: item must name a finding or grade item")
    data = default_data()
    data["referral"]["threshold"] = 1.5
    refused(data, r"threshold must be a number in \[0, 1\]")
    data = default_data()
    data["items"].append(copy.deepcopy(data["items"][0]))
    refused(data, "item ids must be unique")


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        load_protocol(tmp_path / "p.json")


def test_question_over_the_package_limit_is_refused(tiny_package) -> None:
    _, package = tiny_package("siglip-dense", seed=0)
    manifest = Manifest.load(package)
    tokenizer = Tokenizer.from_file(str(package / manifest.tokenizer))
    protocol = load_protocol(DEFAULT_PROTOCOL)
    limit = manifest.decoder.max_seq_len
    ids = option_token_ids(protocol, manifest.prompt, tokenizer, limit, manifest.name)
    assert ids["dr_grade"] == [tokenizer.encode(a, add_special_tokens=False).ids for a in GRADE_LETTERS]
    data = default_data()
    data["items"][0]["question"] = "Which eye is this? " * limit
    with pytest.raises(ProtocolError, match=r"'laterality': the question is too long for package .* allows "
                                            rf"{limit}; shorten the question"):
        option_token_ids(parse_protocol(data), manifest.prompt, tokenizer, limit, manifest.name)


def scored(gradable: bool, **items: dict[str, float]) -> dict[str, Any]:
    return {"gradable": gradable, "items": {k: {"probabilities": v} for k, v in items.items()} if gradable else {}}


def test_per_eye_aggregation_and_referral() -> None:
    protocol = load_protocol(DEFAULT_PROTOCOL)
    base = {"laterality": {"Right": 0.9, "Left": 0.1}, "amd": {"Yes": 0.1, "No": 0.9},
            "cdr_large": {"Yes": 0.2, "No": 0.8}}
    grade_mild = {"A": 0.1, "B": 0.7, "C": 0.1, "D": 0.05, "E": 0.05}
    grade_severe = {"A": 0.1, "B": 0.1, "C": 0.2, "D": 0.5, "E": 0.1}
    first = scored(True, **base, referable_dr={"Yes": 0.3, "No": 0.7}, dr_grade=grade_severe)
    second = scored(True, **{**base, "laterality": {"Right": 0.7, "Left": 0.3}},
                    referable_dr={"Yes": 0.6, "No": 0.4}, dr_grade=grade_mild)
    eye = screen_eye(protocol, [first, second, scored(False)])
    # any-positive for findings: the image with the higher P(Yes); worst image for the grade; mean laterality
    assert eye["items"]["referable_dr"]["probabilities"] == {"Yes": 0.6, "No": 0.4}
    assert eye["items"]["dr_grade"]["answer"] == "D" and eye["items"]["dr_grade"]["code"]["value"] == "312905005"
    assert eye["items"]["laterality"]["probabilities"]["Right"] == pytest.approx(0.8)
    assert (eye["decision"], eye["referral_probability"]) == ("refer", 0.6)
    assert screen_eye(protocol, [first])["decision"] == "no_refer"  # 0.3 < 0.5
    # an eye whose every image failed the gate is ungradable, never normal
    assert screen_eye(protocol, [scored(False), scored(False)]) == {
        "decision": "ungradable", "gradable": False, "items": {}, "referral_probability": None}


def test_patient_decision() -> None:
    assert patient_decision(["no_refer", "refer"]) == "refer"
    assert patient_decision(["ungradable", "refer"]) == "refer"
    assert patient_decision(["no_refer", "ungradable"]) == "ungradable"
    assert patient_decision(["no_refer", "no_refer"]) == "no_refer"

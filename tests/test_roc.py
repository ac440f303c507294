"""ROC, AUC, intervals and threshold calibration against values computed by hand on small tables."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fundusrt.bench.roc import at_threshold, auc, roc_curve, threshold_for_sensitivity, wilson
from fundusrt.bench.screening import calibrate, evaluate, read_table
from fundusrt.runtime.protocol import DEFAULT_PROTOCOL, PROTOCOL_NAME, load_protocol

# positives score 0.9, 0.8, 0.6, 0.3; negatives 0.7, 0.55, 0.4, 0.2
SCORES = [0.9, 0.8, 0.7, 0.6, 0.55, 0.4, 0.3, 0.2]
LABELS = [True, True, False, True, False, False, True, False]


def test_roc_by_hand() -> None:
    # walking the thresholds down, each score adds one case: a positive raises TPR by 1/4, a negative FPR
    assert roc_curve(SCORES, LABELS) == [
        (float("inf"), 0.0, 0.0), (0.9, 0.0, 0.25), (0.8, 0.0, 0.5), (0.7, 0.25, 0.5), (0.6, 0.25, 0.75),
        (0.55, 0.5, 0.75), (0.4, 0.75, 0.75), (0.3, 0.75, 1.0), (0.2, 1.0, 1.0)]


def test_auc_by_hand() -> None:
    # positive-over-negative pairs: 0.9 and 0.8 beat all 4, 0.6 beats 3, 0.3 beats 1: 12 of 16
    area, low, high = auc(SCORES, LABELS)
    assert area == 0.75
    # Hanley & McNeil: Q1 = 0.6, Q2 = 0.642857, var = (0.1875 + 3 * 0.0375 + 3 * 0.080357) / 16
    assert low == pytest.approx(0.75 - 1.959964 * 0.183893, abs=1e-5) and high == 1.0
    assert auc([0.5, 0.5], [True, False])[0] == 0.5  # a tie counts half


def test_wilson_interval() -> None:
    interval = wilson(8, 10)  # the textbook case: 0.490 to 0.943
    assert (round(interval.low, 3), round(interval.high, 3)) == (0.49, 0.943)
    assert wilson(10, 10).high == pytest.approx(1.0) and round(wilson(10, 10).low, 3) == 0.722
    assert wilson(0, 10).low == pytest.approx(0.0)


@pytest.mark.parametrize(("target", "threshold", "specificity"), [(0.75, 0.6, 0.75), (0.5, 0.8, 1.0),
                                                                  (1.0, 0.3, 0.25), (0.6, 0.6, 0.75)])
def test_threshold_for_target_sensitivity(target: float, threshold: float, specificity: float) -> None:
    found = threshold_for_sensitivity(SCORES, LABELS, target)
    sensitivity, spec = at_threshold(SCORES, LABELS, found)
    assert found == threshold and sensitivity.value >= target and spec.value == specificity


def write_table(path: Path) -> Path:
    """The hand table as a scored table of the default protocol's referral item."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "item", "option", "probability", "truth"])
        for n, (score, label) in enumerate(zip(SCORES, LABELS, strict=True)):
            truth = "Yes" if label else "No"
            writer.writerow([f"c{n}", "referable_dr", "Yes", score, truth])
            writer.writerow([f"c{n}", "referable_dr", "No", 1 - score, truth])
    return path


def test_calibrate_writes_the_threshold_and_the_set_hash(tmp_path: Path) -> None:
    table = write_table(tmp_path / "table.csv")
    record = calibrate(DEFAULT_PROTOCOL, table, 0.75, tmp_path / "calibrated.json")
    calibrated = load_protocol(tmp_path / "calibrated.json")
    _, sha256 = read_table(table)
    assert calibrated.referral.threshold == 0.6 == record["threshold"]
    assert calibrated.referral.calibration["set_sha256"] == sha256
    assert record["specificity"]["value"] == 0.75 and record["auc"]["value"] == 0.75
    # everything else is the original protocol
    original = json.loads(DEFAULT_PROTOCOL.read_text())
    assert {k: v for k, v in json.loads((tmp_path / "calibrated.json").read_text()).items() if k != "referral"} == {
        k: v for k, v in original.items() if k != "referral"}
    with pytest.raises(ValueError, match="other than the input"):
        calibrate(tmp_path / "calibrated.json", table, 0.9, tmp_path / "calibrated.json")


def test_evaluate_and_the_cli(tmp_path: Path, capsys) -> None:
    from fundusrt.cli import main

    table = write_table(tmp_path / "table.csv")
    figures = evaluate(load_protocol(DEFAULT_PROTOCOL), read_table(table)[0])
    entry = figures["referable_dr"]
    # at the default threshold 0.5: positives 0.9, 0.8, 0.6 called (3 of 4); negatives 0.4, 0.2 below (2 of 4)
    assert (entry["sensitivity"]["k"], entry["specificity"]["k"], entry["auc"]["value"]) == (3, 2, 0.75)
    assert entry["accuracy"]["value"] == 5 / 8
    out = tmp_path / "calibrated.json"
    assert main(["protocol", "calibrate", str(table), "--target-sensitivity", "1.0", "--out", str(out)]) == 0
    assert "referral threshold 0.300000" in capsys.readouterr().out
    assert main(["protocol", "check", str(out)]) == 0
    assert main(["protocol", "evaluate", str(table), "--protocol", str(out)]) == 0
    assert "at p >= 0.300: sensitivity 1.000" in capsys.readouterr().out


def test_score_synthetic_cases_into_a_table(tiny_package, tmp_path: Path, capsys) -> None:
    from fundusrt.bench.screening import synthetic_image
    from fundusrt.cli import main
    from fundusrt.synth.instructions import expected_answer

    _, package = tiny_package("siglip-dense", seed=0)
    table = tmp_path / "table.csv"
    args = ["protocol", "score", "--package", str(package), "--count", "3", "--set", "shifted", "--first-seed", "7",
            "--threads", "1", "--out", str(table)]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["set"], summary["count"], summary["pixel_gradable"]) == ("shifted", 3, 3)
    cases, _ = read_table(table)
    protocol = load_protocol(package / PROTOCOL_NAME)  # the tiny package's own (conftest)
    assert [c.name for c in cases] == ["shifted-7", "shifted-8", "shifted-9"]
    for seed, case in zip((7, 8, 9), cases, strict=True):
        truth = synthetic_image(seed, "shifted")[1]
        for item in protocol.items:
            probs, answer = case.items[item.id]
            assert list(probs) == item.answers and sum(probs.values()) == pytest.approx(1.0)
            assert answer == expected_answer(item.id, truth)

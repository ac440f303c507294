"""The bench harness: text metrics against hand-computed values, MCQ TSV reading and option extraction,
clinical consistency against synthetic ground truth, and one small bench run end to end."""

from __future__ import annotations

import argparse
import base64
import csv
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fundusrt.bench.clinical import FINDING_FIELDS, consistency, consistency_score, read_findings
from fundusrt.bench.evalsets import EvalSetError, detect_kind, read_eval_set, read_mcq_tsv
from fundusrt.bench.measure import primary_value
from fundusrt.bench.metrics import REFUSED, bleu4, extract_option, lcs_length, mcq_prompt, rouge_l, rouge_l_pair
from fundusrt.synth.grading import GroundTruth, Lesion

GRADES = {"A": "No DR", "B": "Mild NPDR", "C": "Moderate NPDR", "D": "Severe NPDR", "E": "Proliferative DR"}


# --- BLEU-4: values worked out by hand from the definition -------------------------------------------

def test_bleu4_hand_computed() -> None:
    # One substitution at the end: precisions 5/6, 4/5, 3/4, 2/3 -> geometric mean (1/3)^(1/4), no penalty.
    assert bleu4(["a b c d e x"], [["a b c d e f"]]) == pytest.approx((1 / 3) ** 0.25)
    # Short candidate: all precisions 1, brevity penalty exp(1 - 6/5).
    assert bleu4(["a b c d e"], [["a b c d e f"]]) == pytest.approx(math.exp(-0.2))
    # Clipping: "a" twice in the candidate, once in the reference -> 4/5, 3/4, 2/3, 1/2.
    assert bleu4(["a a b c d"], [["a b c d e"]]) == pytest.approx(0.2 ** 0.25)
    # No 4-gram in common anywhere: 0 (no smoothing).
    assert bleu4(["the cat sat on the mat"], [["the cat is on the mat"]]) == 0.0


def test_bleu4_is_corpus_level_and_uses_closest_reference_length() -> None:
    # Counts are summed over items (5/8, 3/6, 2/4, 1/2), not sentence scores averaged ((1 + 0) / 2).
    got = bleu4(["a b c d", "a x y z"], [["a b c d"], ["a b c d"]])
    assert got == pytest.approx((5 / 8 * 1 / 2 * 1 / 2 * 1 / 2) ** 0.25)
    # References of 4 and 6 tokens are equally close to 5: the shorter one is used, so no brevity penalty.
    assert bleu4(["a b c d e"], [["a b c d", "a b c d e f"]]) == pytest.approx(1.0)
    # Tokens are lower-cased words and punctuation.
    assert bleu4(["A B, C D."], [["a b , c d ."]]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no reference"):
        bleu4(["a"], [[]])


# --- ROUGE-L ---------------------------------------------------------------------------------------

def test_rouge_l_hand_computed() -> None:
    assert lcs_length("a b c d e".split(), "a x c y e".split()) == 3
    assert rouge_l_pair("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # LCS 2 of 2 and 4 tokens: P 1, R 1/2, F1 2/3.
    assert rouge_l_pair("a b", "a c b d") == pytest.approx(2 / 3)
    assert rouge_l_pair("x y", "a b") == 0.0
    # Best reference per item, then the mean over items.
    assert rouge_l(["a b", "x y"], [["a c b d", "a b"], ["x y"]]) == pytest.approx(1.0)
    assert rouge_l(["a b", "q"], [["a c b d"], ["z"]]) == pytest.approx(1 / 3)


# --- MCQ: VLMEvalKit prompt and option-letter extraction ------------------------------------------

@pytest.mark.parametrize(("answer", "expected"), [
    ("B", "B"),
    ("The answer is (C).", "C"),
    ("D. Severe NPDR", "D"),
    ("Answer: E", "E"),
    ("A or B", None),              # two letters: ambiguous
    ("Mild NPDR", "B"),            # no letter: the one option whose text the answer contains
    ("proliferative dr", "E"),
    ("I cannot tell from this image, it might be anything at all really honestly", None),
    ("Cannot determine the answer", REFUSED),
    ("", None),
])
def test_extract_option(answer: str, expected: str | None) -> None:
    assert extract_option(answer, GRADES) == expected


def test_mcq_prompt_matches_vlmevalkit_format() -> None:
    prompt = mcq_prompt("Which eye?", {"A": "Right", "B": "Left"}, hint="Colour fundus photograph")
    assert prompt == ("Hint: Colour fundus photograph\nQuestion: Which eye?\nOptions:\nA. Right\nB. Left\n"
                      "Please select the correct answer from the options above. \n")


def _png_b64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_mcq_tsv_reads_base64_images_shared_images_and_reports_bad_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    first, second = (rng.integers(0, 256, (20, 30, 3), dtype=np.uint8) for _ in range(2))
    path = tmp_path / "fundus_mmbench.tsv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "A", "B", "C", "answer", "category", "image"])
        writer.writerow([10, "Which eye?", "Right", "Left", "", "B", "laterality", _png_b64(first)])
        writer.writerow([11, "Grade?", "none", "mild", "moderate", "C", "grading", "10"])  # shares row 10's image
        writer.writerow([12, "Grade?", "none", "mild", "", "C", "grading", _png_b64(second)])  # C is empty
        writer.writerow([13, "Grade?", "none", "mild", "", "A", "grading", base64.b64encode(b"text " * 40).decode()])
        writer.writerow([14, "Grade?", "none", "mild", "", "A", "grading", _png_b64(second)])
    assert detect_kind(path) == "mcq"
    data = read_mcq_tsv(path)
    assert [i.item_id for i in data.items] == ["10", "11", "14"]
    np.testing.assert_array_equal(data.items[0].load(), first)
    np.testing.assert_array_equal(data.items[1].load(), first)
    np.testing.assert_array_equal(data.items[2].load(), second)
    assert data.items[0].options == {"A": "Right", "B": "Left"} and data.items[0].answer == "B"
    assert data.items[0].question == mcq_prompt("Which eye?", {"A": "Right", "B": "Left"})
    assert data.items[1].category == "grading"
    assert len(data.issues) == 2
    assert "index 12" in data.issues[0] and "not one of the options" in data.issues[0]
    assert "index 13" in data.issues[1] and "not a readable image" in data.issues[1]

    broken = tmp_path / "broken.tsv"
    broken.write_text("index\tquestion\tanswer\n1\tq\tA\n", encoding="utf-8")
    with pytest.raises(EvalSetError, match=r"missing columns \['image'\]"):
        read_mcq_tsv(broken)


# --- clinical consistency --------------------------------------------------------------------------

def _truth(lesions: list[tuple[str, int]], cdr: float = 0.3) -> GroundTruth:
    boxes = [Lesion(kind, (10 * i, 10, 10 * i + 5, 15), (10 * i + 2.5, 12.5))
             for i, (kind, n) in enumerate((k, n) for k, n in lesions for _ in range(n))]
    return GroundTruth.from_lesions(laterality="R", cup_to_disc_ratio=cdr, disc_center=(50, 50), disc_radius=10,
                                    fovea_center=(100, 50), fov_center=(75, 50), fov_radius=70, width=150,
                                    height=100, lesions=boxes)


def test_read_findings_rules() -> None:
    found = read_findings("Findings: haemorrhages, hard exudates; no drusen.\nImpression: moderate NPDR, referable.")
    assert found.dr_grade == 2 and found.referable_dr and not found.amd and not found.glaucoma_suspect
    assert found.lesions == {"haemorrhage", "hard_exudate"}
    assert read_findings("No diabetic retinopathy. Not referable.").dr_grade == 0
    assert read_findings("Severe NPDR without neovascularisation").lesions == frozenset()
    assert read_findings("glaucoma suspect; drusen of AMD").glaucoma_suspect
    assert read_findings("").dr_grade is None


def test_consistency_against_hand_built_truth() -> None:
    truth = _truth([("haemorrhage", 2), ("hard_exudate", 1)], cdr=0.7)  # grade 2, referable, glaucoma suspect
    assert truth.dr_grade == 2 and truth.glaucoma_suspect
    right = "Findings: haemorrhages and hard exudates. Impression: moderate NPDR, referable; glaucoma suspect."
    assert all(consistency(right, truth).values())
    wrong = consistency("No DR. No lesions.", truth)
    assert [f for f, ok in wrong.items() if not ok] == ["dr_grade", "referable_dr", "glaucoma_suspect",
                                                        "haemorrhage", "hard_exudate"]
    result = consistency_score([right, "No DR. No lesions."], [truth, truth])
    assert result["score"] == pytest.approx((1 + (len(FINDING_FIELDS) - 5) / len(FINDING_FIELDS)) / 2)
    assert result["per_field"]["amd"] == 1.0 and result["per_field"]["dr_grade"] == 0.5
    # An empty answer misses the grade and every present finding.
    assert result["empty_answer_score"] == pytest.approx((len(FINDING_FIELDS) - 5) / len(FINDING_FIELDS))


def test_synthetic_reference_reports_are_fully_consistent_with_their_truth() -> None:
    from fundusrt.synth.fundus import draw_fundus, random_case
    from fundusrt.synth.instructions import structured_report

    truths = [draw_fundus(random_case(seed, 256, 256))[1] for seed in range(12)]
    assert len({t.dr_grade for t in truths}) > 1, "the seeds should cover several grades"
    result = consistency_score([structured_report(t) for t in truths], truths)
    assert result["score"] == 1.0, result["per_field"]


# --- one small bench, end to end -------------------------------------------------------------------

def _strict_json(path: Path) -> dict:
    def no_nan(token: str) -> None:
        raise AssertionError(f"{path} holds {token}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=no_nan)


def test_quick_bench_runs_and_writes_well_formed_outputs(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from fundusrt.bench.cli import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "bench"
    args = parser.parse_args(["--quick", "--out", str(out), "--eval-count", "2", "--repeats", "2",
                              "--max-new-tokens", "6", "--threads", "1", "--backends", "ort-cpu,ort-cuda,torch",
                              "--screening", "8"])
    assert main(args) == 0
    doc = _strict_json(out / "bench.json")
    assert doc["format"] == "fundusrt-bench/1"
    assert doc["hardware"]["usable_cores"] >= 1 and doc["versions"]["onnxruntime"]
    assert doc["memory_bandwidth"]["host_bytes_per_s"] > 1e8
    assert {s["kind"] for s in doc["eval_sets"]} == {"mcq", "open", "studies"}
    by_backend = {c["backend"]: c for c in doc["configs"]}
    assert by_backend["ort-cpu"]["status"] == "ok"
    assert by_backend["torch"]["status"] == "unavailable" and "unknown backend" in by_backend["torch"]["reason"]
    cpu = by_backend["ort-cpu"]
    assert len(cpu["package"]["manifest_sha256"]) == 64 and cpu["package"]["files"]
    assert cpu["peak_rss_mib"] > 0
    # the demo package was never taught the VLMEvalKit MCQ prompt and does not declare it: its MCQ set is
    # skipped with the reason, for the package and for the baseline run of its checkpoint
    mcq = next(s["name"] for s in doc["eval_sets"] if s["kind"] == "mcq")
    for config in (cpu, doc["baseline"]):
        assert "does not declare the VLMEvalKit multiple-choice prompt" in config["sets"].pop(mcq)["skipped"]
    for name, data in cpu["sets"].items():
        assert "error" not in data, (name, data)
        e2e = data["latency"]["e2e_ms"]
        assert 0 < e2e["p50"] <= e2e["p95"] <= e2e["p99"] and e2e["runs"] == 2
        assert data["accuracy"]["items"] >= 1 and 0 <= primary_value(data["accuracy"]) <= 1
        assert data["roofline"]["bytes_per_token"] > data["roofline"]["weight_bytes"] > 0
        assert data["vs_baseline"]["e2e_speedup"] > 0
    baseline = doc["baseline"]
    assert baseline["backend"] == "transformers-eager" and set(baseline["sets"]) == set(cpu["sets"])
    markdown = (out / "bench.md").read_text(encoding="utf-8")
    assert markdown.count("| transformers-eager |") == 3 and markdown.count("| ort-cpu |") == 3
    assert markdown.count(f"| {mcq} | skipped: package 'fundusrt-demo' does not declare") == 2, markdown
    # what the demo package was trained to answer, scored on held-out synthetic cases: it gets the eye right
    (screening,) = doc["screening"]
    assert screening["count"] == 8 and screening["protocol"]["name"] == "fundusrt-synthetic-screening"
    assert list(screening["items"]) == ["laterality", "referable_dr", "dr_grade", "amd", "cdr_large", "gradable"]
    assert screening["items"]["laterality"]["accuracy"]["value"] >= 7 / 8
    assert "| laterality | " in markdown and "Screening protocol fundusrt-synthetic-screening" in markdown
    with Image.open(out / "pareto.png") as plot:
        assert plot.format == "PNG" and plot.width > 300
    # The synthetic sets the bench wrote are in the public formats and read back through the same readers.
    sets = {s["kind"]: read_eval_set(s["source"]) for s in doc["eval_sets"]}
    assert all(len(s.items) >= 1 and not s.issues for s in sets.values())
    _declaring_package_runs_mcq(out / "work", sets["mcq"].source, tmp_path)


def _declaring_package_runs_mcq(work: Path, tsv: str, tmp_path: Path) -> None:
    """The same package declaring the MCQ prompt in its manifest runs the MCQ set; undeclared, it skips it."""
    from fundusrt.bench.demo import ensure_demo_package
    from fundusrt.bench.measure import MeasureSettings
    from fundusrt.bench.runner import BenchPlan, run_bench
    from fundusrt.manifest import MCQ_PROMPT_KEY, Manifest

    _, package = ensure_demo_package(work, lambda line: None)  # built by the quick run: reused
    declaring = tmp_path / "declaring"
    shutil.copytree(package, declaring)
    manifest = Manifest.load(declaring)
    manifest.extra[MCQ_PROMPT_KEY] = "vlmevalkit"
    manifest.save(declaring)
    plan = BenchPlan(packages=[declaring, package], backends=["ort-cpu"], eval_sets=[Path(tsv)], baseline=False,
                     settings=MeasureSettings(warmup=0, repeats=1, latency_items=1, limit=2, max_new_tokens=4),
                     threads=1, bandwidth_mib=16)
    declared, undeclared = run_bench(plan, lambda line: None)["configs"]
    (name,) = declared["sets"]
    assert declared["status"] == "ok" and declared["sets"][name]["accuracy"]["items"] == 2
    assert set(undeclared["sets"][name]) == {"skipped"}


def test_only_mcq_sets_need_a_declaration() -> None:
    from fundusrt.bench.runner import skip_reason
    from fundusrt.manifest import MCQ_PROMPT_KEY

    class Fake:  # skip_reason reads only these two fields of a Manifest
        def __init__(self, extra: dict[str, str]) -> None:
            self.name, self.extra = "m", extra

    assert skip_reason(Fake({}), "open") is None and skip_reason(Fake({}), "studies") is None
    assert skip_reason(Fake({MCQ_PROMPT_KEY: "vlmevalkit"}), "mcq") is None
    assert "does not declare" in skip_reason(Fake({}), "mcq")
    assert "unknown MCQ prompt 'mmbench'" in skip_reason(Fake({MCQ_PROMPT_KEY: "mmbench"}), "mcq")


def test_bad_inputs_fail_with_a_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fundusrt.bench.cli import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    tsv = tmp_path / "set.tsv"
    tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n", encoding="utf-8")
    cases = [
        (["--package", str(tmp_path / "nope"), "--eval", str(tsv)], "no rows"),
        (["--package", str(tmp_path / "nope"), "--eval", str(tmp_path / "missing.json")], "does not exist"),
        (["--eval", str(tsv)], "no --package given"),
    ]
    for argv, message in cases:
        assert main(parser.parse_args([*argv, "--out", str(tmp_path / "out")])) == 1
        err = capsys.readouterr().err
        assert err.startswith("fundusrt bench: error:") and message in err, err
    studies = tmp_path / "studies"
    studies.mkdir()
    with pytest.raises(EvalSetError, match="no study with ground_truth.json"):
        read_eval_set(studies)

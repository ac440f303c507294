"""Option scoring (the probability of each closed answer) against a direct PyTorch computation.

The reference runs the PyTorch model once over prompt + option with no cache and sums the log-softmax
of the option's tokens; the runtime scores from the image's shared KV prefix, an item's multi-token options
in batched decoder calls.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fundusrt.kernels import patchify
from fundusrt.prompt import build_input_ids
from fundusrt.runtime.pipeline import Pipeline, load_package
from fundusrt.runtime.protocol import DEFAULT_PROTOCOL, parse_protocol
from tests._protocols import protocol_without_gradability

torch = pytest.importorskip("torch")

from tests.test_runtime_pipeline import built, pipe  # noqa: E402,F401  (the same package and pipeline fixtures)

SINGLE = ["A", "B", "C"]
MULTI = ["proliferative retinopathy", "no apparent retinopathy", "Left"]


def protocol_with(items: dict[str, list[str]]):
    data = json.loads(DEFAULT_PROTOCOL.read_text())
    code = {"value": "x", "scheme": "99FUNDUSRT", "meaning": "x"}
    data["items"] = [{"id": item_id, "role": "grade", "question": f"Question {n}: which one?", "concept": code,
                      "options": [{"answer": a, "code": code} for a in answers]}
                     for n, (item_id, answers) in enumerate(items.items())]
    data["referral"] = {"item": "single", "positive": ["C"], "threshold": 0.5}
    return parse_protocol(data)


def reference_log_likelihood(model, pipe: Pipeline, image: np.ndarray, question: str, option: str) -> float:
    """log P(option | prompt) from one uncached forward pass over prompt + option."""
    patches = patchify(image, pipe.manifest.preprocessing)
    prompt = build_input_ids(pipe.manifest.prompt, pipe.tokenizer, question,
                             [patches.num_tiles * pipe.manifest.prompt.tokens_per_tile])
    option_ids = pipe.tokenizer.encode(option, add_special_tokens=False).ids
    ids = torch.from_numpy(np.concatenate([prompt, option_ids]))[None]
    with torch.inference_mode():
        embeds = model.prompt_embeds(ids, torch.from_numpy(patches.pixel_values))
        logits = model.language_model(inputs_embeds=embeds).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    # the logits at position p predict token p + 1
    return float(sum(log_probs[len(prompt) - 1 + k, t] for k, t in enumerate(option_ids)))


def test_option_scores_equal_the_pytorch_reference(pipe: Pipeline, built: tuple[Path, Path]) -> None:
    from fundusrt.models import load

    model = load(built[0])
    protocol = protocol_with({"single": SINGLE, "multi": MULTI})
    lengths = {a: len(pipe.tokenizer.encode(a, add_special_tokens=False).ids) for a in SINGLE + MULTI}
    assert all(lengths[a] == 1 for a in SINGLE) and all(lengths[a] > 1 for a in MULTI[:2]), lengths
    image = np.random.default_rng(5).integers(0, 256, (96, 120, 3), dtype=np.uint8)
    scores = pipe.score(image, protocol)
    for item in protocol.items:
        ours = scores[item.id]
        expected = {a: reference_log_likelihood(model, pipe, image, item.question, a) for a in item.answers}
        worst = max(abs(ours.log_likelihoods[a] - expected[a]) for a in item.answers)
        assert worst < 1e-4, f"{item.id}: log-likelihood max abs diff {worst:.3g}: {ours.log_likelihoods} vs {expected}"
        reference = np.exp(np.array(list(expected.values())) - max(expected.values()))
        reference /= reference.sum()
        np.testing.assert_allclose(list(ours.probabilities.values()), reference, atol=1e-4)
        assert sum(ours.probabilities.values()) == pytest.approx(1.0)



def test_study_report_screens_each_eye(pipe: Pipeline, tmp_path: Path) -> None:
    from _real_fundus import left_eye, right_eye
    from test_real_photos import write_photo

    from fundusrt.dicom import read_study

    write_photo(tmp_path / "right.dcm", right_eye(), "R")
    write_photo(tmp_path / "left-dark.dcm", (left_eye() * 0.15).astype(np.uint8), "L")
    study = read_study(tmp_path)
    data = pipe.run_study(study).to_dict()
    protocol = pipe.protocol
    screening = data["screening"]
    assert data["format"] == "fundusrt-report/1"
    assert screening["protocol"] == protocol.identity() and screening["threshold"] == protocol.referral.threshold
    left, right = data["eyes"]["L"], data["eyes"]["R"]
    assert (left["decision"], left["gradable"], left["items"]) == ("ungradable", False, {})
    assert right["gradable"] and list(right["items"]) == [i.id for i in protocol.items]
    # one image per eye: the eye's items are the image's, and equal scoring and asking that image on its own
    pixels = next(i.pixels for i in study.images if i.laterality == "R")
    alone = pipe.score(pixels)
    for item_id, item in right["items"].items():
        assert sum(item["probabilities"].values()) == pytest.approx(1.0)
        np.testing.assert_allclose(list(item["probabilities"].values()),
                                   list(alone[item_id].probabilities.values()), atol=1e-6)
        assert item["answer"] == max(item["probabilities"], key=item["probabilities"].get)
        assert item["code"] == protocol.item(item_id).option(item["answer"]).code.to_dict()
    # the tiny package names no questions: the generic ones are asked as free text beside the scored items
    image = next(i for i in data["images"] if i["laterality"] == "R")
    assert [a["question"] for a in image["answers"]] == pipe.default_questions
    assert image["answers"][0]["answer"] == pipe.ask(pixels, pipe.default_questions[0]).text
    refer = right["referral_probability"] >= protocol.referral.threshold
    assert right["decision"] == ("refer" if refer else "no_refer")
    assert screening["decision"] == ("refer" if refer else "ungradable")  # the dark left eye is never "normal"
    text = pipe.run_study(study).render_text()
    assert "Decision: UNGRADABLE" in text and f"Screening decision: {'REFER' if refer else 'UNGRADABLE'}" in text


def test_questions_the_protocol_scores_are_not_asked_again(built: tuple[Path, Path], tmp_path: Path) -> None:
    from fundusrt.synth import write_study

    pipe = load_package(built[1], threads=1)
    scored = pipe.protocol.items[1].question
    pipe.manifest.default_questions = [scored, "Describe the optic disc."]
    study = write_study(tmp_path / "study", seed=1, size=(256, 256), variants=("op",)).out_dir
    data = pipe.run_study(study).to_dict()
    assert all([a["question"] for a in i["answers"]] == ["Describe the optic disc."] for i in data["images"])
    assert all(pipe.protocol.items[1].id in i["items"] for i in data["images"])


def test_which_protocol_runs(built: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    import shutil

    from _real_fundus import right_eye
    from test_real_photos import write_photo

    from fundusrt.cli import main
    from fundusrt.runtime.protocol import PROTOCOL_NAME

    package = tmp_path / "pkg"
    shutil.copytree(built[1], package)
    study = tmp_path / "study"
    study.mkdir()
    write_photo(study / "right.dcm", right_eye(), "R")
    own = json.loads(DEFAULT_PROTOCOL.read_text()) | {"name": "package-own"}
    own["items"] = own["items"][:2]
    (package / PROTOCOL_NAME).write_text(json.dumps(own))
    given = protocol_without_gradability() | {"name": "given"}  # a random model's P(gradable) means nothing
    (tmp_path / "given.json").write_text(json.dumps(given))

    def run(*extra: str) -> dict:
        out = tmp_path / "report.json"
        assert main(["run", str(study), "--package", str(package), "--json", str(out), *extra]) == 0
        return json.loads(out.read_text())

    report = run()  # the package's own protocol when it carries one
    assert report["screening"]["protocol"]["name"] == "package-own"
    assert list(report["eyes"]["R"]["items"]) == ["laterality", "referable_dr"]
    report = run("--protocol", str(tmp_path / "given.json"))  # --protocol wins
    assert report["screening"]["protocol"]["name"] == "given" and len(report["eyes"]["R"]["items"]) == 5
    given["format_version"] = 99
    (tmp_path / "given.json").write_text(json.dumps(given))
    capsys.readouterr()
    assert main(["run", str(study), "--package", str(package), "--protocol", str(tmp_path / "given.json")]) == 1
    assert "format_version 99, newer than this fundusrt reads" in capsys.readouterr().err

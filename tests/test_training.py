"""Training: data readers and the bad-sample policy, assistant-only labels, train/serve identity with the
runtime Pipeline, loss going down, exact resumption, and LoRA -> merge -> export giving the adapter's tokens."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("peft")
pytest.importorskip("onnxscript")

from fundusrt.config import SIGLIP_MEAN, SIGLIP_STD, GenerationConfig, TilingConfig
from fundusrt.export import export_package
from fundusrt.kernels import patchify, plan_image
from fundusrt.models import load
from fundusrt.models.layouts import native
from fundusrt.models.tiny import build_tiny_model, tiny_config
from fundusrt.models.tokenizer import build_tokenizer
from fundusrt.prompt import build_input_ids
from fundusrt.runtime.pipeline import load_package
from fundusrt.synth.fundus import draw_fundus, random_case
from fundusrt.synth.instructions import parse_closed_answer, write_instructions
from fundusrt.training import cli as train_cli
from fundusrt.training.adapters import apply_adapter, set_trainable
from fundusrt.training.config import DataConfig, TrainConfig
from fundusrt.training.evaluate import evaluate_package
from fundusrt.training.records import DataError, DataIssue, Record, read_records
from fundusrt.training.samples import (
    IGNORE_INDEX,
    Sample,
    apply_bad_sample_policy,
    encode_conversation,
    load_image,
    prepare_record,
    prepare_samples,
)
from fundusrt.training.trainer import Trainer, train
from fundusrt.training.warmup import (
    closed_questions,
    grounding_questions,
    parse_boxes,
    token_targets,
    warm_up_vision,
)

TYPES = ("laterality", "referable_dr")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training")
    # one 56 px tile per image (49 image tokens) keeps every step cheap on a shared CPU
    config = dataclasses.replace(tiny_config("siglip-dense", build_tokenizer().get_vocab_size()),
                                 tiling=TilingConfig(policy="single", tile_size=56, mean=SIGLIP_MEAN, std=SIGLIP_STD))
    base = native.save(build_tiny_model(config=config, seed=3), root / "base")
    data = write_instructions(root / "data", count=3, seed_start=5, types=TYPES, sizes=((256, 256),))
    return {"root": root, "base": base, "data": data, "cache": root / "cache"}


def _config(work: dict[str, Path], out: str, **overrides) -> TrainConfig:
    data = DataConfig(train=[str(work["data"])], max_seq_len=1024, cache_dir=str(work["cache"]))
    settings = {"output_dir": str(work["root"] / out), "data": data, "base": str(work["base"]), "method": "full", "lr": 3e-3,
                    "warmup_steps": 1, "batch_size": 3, "max_steps": 4, "log_every": 1, "seed": 1, "resume": False}
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture(scope="module")
def lora_run(work):
    config = _config(work, "lora", method="lora", connector="full", vision_blocks=1, lr=2e-2,
                     lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    result = train(config, log=lambda line: None)
    package = export_package(result.merged_dir, work["root"] / "lora-pkg", max_seq_len=1024)
    return result, package


# -- data ----------------------------------------------------------------------------------------

def _write_bad_llava(root: Path, image: Path) -> Path:
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    good = [{"from": "human", "value": "<image>\nWhich eye is this?"}, {"from": "gpt", "value": "Left"}]
    records = [
        {"image": str(image), "conversations": good},                                         # fine
        {"image": "missing.png", "conversations": good},                                      # missing image
        {"image": str(image), "conversations": [{"from": "human", "value": "<image>\nHi"}]},  # no answer
        {"image": str(image), "conversations": [*good[:1], {"from": "gpt", "value": "  "}]},  # empty answer
        {"image": str(image), "conversations": [
            {"from": "human", "value": "<image>\nLocate the disc."},
            {"from": "gpt", "value": "<ref>optic disc</ref><box>[[10,20,1200,60]]</box>"}]},  # box outside
        {"image": "corrupt.png", "conversations": good},                                      # unreadable image
        {"image": "bad.dcm", "conversations": good},                                          # unreadable DICOM
        {"image": str(image), "conversations": [{"from": "human", "value": "<image>\n" + "why " * 900},
                                                {"from": "gpt", "value": "No"}]},             # over the context
        "not an object",
    ]
    path = root / "bad.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n")
    return path


def test_bad_samples_are_reported_with_file_and_line_and_skipped(work, tmp_path) -> None:
    image = work["data"].parent / "images" / "synth-0000005.png"
    path = _write_bad_llava(tmp_path, image)
    model = load(work["base"])
    samples, issues = prepare_samples([path], model.prompt, model.tokenizer, model.config.tiling, max_seq_len=1024,
                                      cache_dir=tmp_path / "cache", on_issue=lambda issue: None)
    assert [s.where for s in samples] == [f"{path}:2"]
    expected = {3: "does not exist", 4: "no answer", 5: "is empty", 6: "outside the image", 7: "unreadable image",
                8: "unreadable DICOM", 9: "over the context length", 10: "must be a JSON object"}
    assert {issue.line: issue.reason for issue in issues}.keys() == expected.keys()
    for issue in issues:
        assert issue.file == str(path) and expected[issue.line] in issue.reason, str(issue)
    with pytest.raises(DataError, match=rf"{path}:3"):
        apply_bad_sample_policy(samples, issues, "error", 1.0)
    with pytest.raises(DataError, match="max_bad_fraction"):
        apply_bad_sample_policy(samples, issues, "skip", 0.5)
    apply_bad_sample_policy(samples, issues, "skip", 0.9)


def test_jsonl_reader_keeps_going_after_a_broken_line(work, tmp_path) -> None:
    image = work["data"].parent / "images" / "synth-0000006.png"
    turns = [{"from": "human", "value": "<image>\n<image>\nSame eye?"}, {"from": "gpt", "value": "Yes"}]
    lines = [json.dumps({"image": [str(image), str(image)], "conversations": turns}), "{broken",
             "", json.dumps({"image": str(image), "conversations": turns})]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    items = list(read_records(path))
    assert isinstance(items[0], Record) and len(items[0].images) == 2 and items[0].line == 1
    assert isinstance(items[1], DataIssue) and items[1].line == 2 and "invalid JSON" in items[1].reason
    assert isinstance(items[2], DataIssue) and items[2].line == 4 and "2 <image> placeholders for 1 images" in items[2].reason


def test_labels_cover_only_the_assistant_answers(work) -> None:
    model = load(work["base"])
    spec, tok = model.prompt, model.tokenizer
    turns = [("<image>\nWhich eye is this?", "Left eye"), ("Any drusen?", "No")]
    encoded = encode_conversation(spec, tok, turns, [49])
    first = build_input_ids(spec, tok, turns[0][0], [49])
    np.testing.assert_array_equal(encoded.input_ids[:len(first)], first)
    labelled = encoded.labels != IGNORE_INDEX
    np.testing.assert_array_equal(encoded.labels[labelled], encoded.input_ids[labelled])
    # the labelled runs decode to exactly each answer followed by the end-of-turn token
    runs, run = [], []
    for token, keep in zip(encoded.input_ids.tolist(), labelled.tolist(), strict=True):
        if keep:
            run.append(token)
        elif run:
            runs.append(tok.decode(run, skip_special_tokens=False))
            run = []
    assert runs == ["Left eye<|im_end|>", "No<|im_end|>"]


# -- train/serve identity ------------------------------------------------------------------------

class _Recorder:
    """Passes calls through to a real runtime session and keeps its inputs."""

    def __init__(self, session) -> None:
        self.session, self.inputs = session, []

    def run(self, feeds):
        self.inputs.append({k: np.array(v) for k, v in feeds.items()})
        return self.session.run(feeds)


def test_training_tensors_are_what_the_runtime_feeds(work, lora_run, tmp_path) -> None:
    from fundusrt.synth.dicom_writer import write_op_image

    _, package = lora_run
    image, truth = draw_fundus(random_case(21, 320, 320))
    dcm = write_op_image(tmp_path / "eye.dcm", image, laterality=truth.laterality)
    question = "Which eye is this?"
    pipe = load_package(package)
    vision, embed = _Recorder(pipe.sessions.vision), _Recorder(pipe.sessions.embed)
    pipe.sessions.vision, pipe.sessions.embed = vision, embed
    pipe.run_study(dcm, [question], GenerationConfig(max_new_tokens=2))

    model = load(work["base"])
    record = Record(str(tmp_path / "x.json"), 1, [dcm], [(question, "Left")])
    sample = prepare_record(record, model.prompt, model.tokenizer, model.config.tiling, 1024, tmp_path / "cache")
    (served_pixels,) = vision.inputs[0].values()
    assert sample.pixel_values().dtype == served_pixels.dtype
    np.testing.assert_array_equal(sample.pixel_values(), served_pixels)
    (served_ids,) = embed.inputs[0].values()
    np.testing.assert_array_equal(sample.input_ids[:served_ids.shape[1]], served_ids[0])
    assert (sample.labels[:served_ids.shape[1]] == IGNORE_INDEX).all()


# -- optimisation --------------------------------------------------------------------------------

def test_a_few_steps_lower_the_loss(work) -> None:
    trainer = Trainer(_config(work, "full", max_steps=6), log=lambda line: None)
    samples = trainer.prepare(trainer.config.data.train, work["root"] / "bad.jsonl")
    before = trainer.evaluate_loss(samples)
    result = trainer.run()
    after = trainer.evaluate_loss(samples)
    assert after < 0.8 * before, (before, after)
    metrics = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))
    assert all(m["tokens_per_s"] > 0 and m["eta_s"] >= 0 and np.isfinite(m["loss"]) for m in metrics)
    assert load(result.merged_dir).config == load(work["base"]).config


def test_resumed_run_matches_an_uninterrupted_one(work, capsys) -> None:
    flat = {"min_lr_ratio": 1.0, "warmup_steps": 0, "max_steps": 4, "batch_size": 2}  # lr independent of the total
    straight = train(_config(work, "straight", **flat), log=lambda line: None)
    first = _config(work, "resumed", **{**flat, "max_steps": 2})
    config_file = work["root"] / "resume.json"
    config_file.write_text(json.dumps(first.to_dict()))
    args = argparse.Namespace(config=str(config_file), max_steps=None, no_resume=False, evaluate=None, plan=False)
    assert train_cli.main(args) == 0
    assert capsys.readouterr().out.strip().endswith("merged")
    first.max_steps, first.resume = 4, True
    lines: list[str] = []
    resumed = train(first, log=lines.append)
    assert any("resumed from" in line and "step-00000002" in line for line in lines)
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def test_cli_reports_a_bad_config(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"output_dir": str(tmp_path), "data": {"train": ["x.json"]}, "method": "lora"}))
    args = argparse.Namespace(config=str(bad), max_steps=None, no_resume=False, evaluate=None, plan=False)
    assert train_cli.main(args) == 1
    assert "exactly one of `base`" in capsys.readouterr().err


@pytest.mark.parametrize(("overrides", "message"), [
    ({"init_model": {"vision": {}}}, "exactly one of"),
    ({"base": None, "init_model": {"vision": {}, "connector": {}, "text": {"config": {}}, "tiling": {}},
      "method": "lora"}, "needs method 'full'"),
    ({"connector": "half"}, "connector must be"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
])
def test_config_validation(work, overrides, message) -> None:
    with pytest.raises(ValueError, match=message):
        _config(work, "never", **overrides)


def test_a_sample_that_breaks_at_train_time_is_skipped(work) -> None:
    lines: list[str] = []
    trainer = Trainer(_config(work, "skip"), log=lines.append)
    samples = trainer.prepare(trainer.config.data.train, work["root"] / "bad.jsonl")
    broken = type(samples[0])(samples[0].where, [work["root"] / "gone.npy"], samples[0].input_ids, samples[0].labels)
    batch = trainer.load_batch([broken, *samples[1:]], np.arange(len(samples)))
    assert batch is not None and batch.where == [s.where for s in samples[1:]]
    assert any(samples[0].where in line and "skipped" in line for line in lines)


# -- LoRA ----------------------------------------------------------------------------------------

def test_lora_trains_the_chosen_parts_only(work, lora_run) -> None:
    result, _ = lora_run
    base, merged = load(work["base"]).state_dict(), load(result.merged_dir).state_dict()
    assert base.keys() == merged.keys()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    decoder = {n for n in base if n.startswith("language_model.model.layers.")
               and n.rsplit(".", 2)[-2] in ("q_proj", "v_proj", "down_proj") and n.endswith("weight")}
    connector = {n for n in base if n.startswith("connector.")}
    last_block = {n for n in base if n.startswith("vision.encoder.layers.3.")}
    assert decoder <= changed and connector <= changed and last_block <= changed
    assert changed <= decoder | connector | last_block
    adapter = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter["base_checkpoint"] == str(work["base"]) and len(adapter["target_modules"]) == 6


def test_merged_export_gives_the_adapter_models_tokens(work, lora_run) -> None:
    result, package = lora_run
    adapted = apply_adapter(load(work["base"]), result.adapter_dir)
    base = load(work["base"])
    pipe = load_package(package)
    spec, tiling = adapted.prompt, adapted.config.tiling
    for seed, question in ((5, "Which eye is this?"), (30, "Is there referable diabetic retinopathy?")):
        image, _ = draw_fundus(random_case(seed, 256, 256))
        pixels = torch.from_numpy(patchify(image, tiling).pixel_values)
        ids = build_input_ids(spec, adapted.tokenizer, question, [pixels.shape[0] * spec.tokens_per_tile])
        expected = adapted.generate(ids, pixels, max_new_tokens=6)
        if expected[-1] in spec.stop_token_ids:  # the runtime does not return the stop token
            expected = expected[:-1]
        assert pipe.ask(image, question, GenerationConfig(max_new_tokens=6)).token_ids == expected
        with torch.no_grad():
            ids_t = torch.from_numpy(ids)[None]
            logits = [m.language_model(inputs_embeds=m.prompt_embeds(ids_t, pixels)).logits[0, -1] for m in (adapted, base)]
        assert (logits[0] - logits[1]).abs().max() > 1e-3, "the adapter changed nothing"


def test_evaluation_scores_each_question_type_through_the_runtime(work, lora_run) -> None:
    _, package = lora_run
    report = evaluate_package(package, work["data"], log=lambda line: None)
    assert report["images"] == 3 and set(report["per_type"]) == set(TYPES)
    pipe = load_package(package)
    for qtype in TYPES:
        correct = 0
        for record in read_records(work["data"]):
            turn = record.extra["fundusrt"]["types"].index(qtype)
            question, reference = record.turns[turn]
            answer = pipe.ask(load_image(record.images[0]), question, GenerationConfig(max_new_tokens=8)).text
            correct += parse_closed_answer(qtype, answer) == reference
        assert report["per_type"][qtype]["correct"] == correct and report["per_type"][qtype]["total"] == 3


# -- vision warm-up ----------------------------------------------------------------------------------

def _side_samples(root: Path, count: int) -> list[Sample]:
    """Samples whose answer is visible only in the pixels: which half of the tile is bright."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        side = "Right" if i % 2 else "Left"
        tile = rng.normal(-0.5, 0.2, (1, 3, 56, 56)).astype(np.float32)
        tile[..., 28:] += 1.5 if side == "Right" else 0.0
        tile[..., :28] += 1.5 if side == "Left" else 0.0
        path = root / f"side-{i}.npy"
        np.save(path, tile)
        # each image asked twice, once with an open question the warm-up must ignore
        samples.append(Sample(f"s{i}", [path], np.zeros(1, np.int64), np.zeros(1, np.int64),
                              (("<image>\nWhich side is bright?", side),)))
        samples.append(Sample(f"s{i}b", [path], np.zeros(1, np.int64), np.zeros(1, np.int64),
                              (("<image>\nDescribe it.", f"free text {i}"),)))
    return samples


def test_vision_warm_up_teaches_the_tower_what_only_the_pixels_show(work, tmp_path: Path) -> None:
    samples = _side_samples(tmp_path, 64)
    assert closed_questions(samples) == {"Which side is bright?": ["Left", "Right"]}
    model = load(work["base"])
    set_trainable(model, _config(work, "unused", freeze_vision=True))
    assert not any(p.requires_grad for p in model.vision.parameters())
    decoder_before = {k: v.clone() for k, v in model.language_model.state_dict().items()}
    vision_before = {k: v.clone() for k, v in model.vision.state_dict().items()}
    accuracy = warm_up_vision(model, samples, steps=80, batch_size=16, lr=3e-3, seed=0,
                              device=torch.device("cpu"), log=lambda line: None)
    assert accuracy["Which side is bright?"] >= 0.9, accuracy
    assert all(torch.equal(v, model.language_model.state_dict()[k]) for k, v in decoder_before.items())
    assert any(not torch.equal(v, model.vision.state_dict()[k]) for k, v in vision_before.items())
    # frozen again for the main loop
    assert not any(p.requires_grad for p in model.vision.parameters())


@pytest.mark.parametrize("policy,roi_crop", [("single", True), ("internvl_dynamic", False), ("internvl_dynamic", True)])
def test_grounding_boxes_mark_the_tokens_patchify_puts_them_in(policy: str, roi_crop: bool) -> None:
    """token_targets against the real patching: paint the box, patchify, see which token cells changed."""
    image, _ = draw_fundus(random_case(21, 900, 600))
    cfg = TilingConfig(policy=policy, tile_size=112, max_tiles=6, mean=(0.0,) * 3, std=(1.0,) * 3, roi_crop=roi_crop)
    grid = 7  # 16 px cells of a 112 px tile
    width, height = 900, 600
    for box in [(400, 300, 430, 340), (600, 300, 602, 304), (450, 420, 560, 600)]:  # inside the retina
        x0, y0 = int(box[0] / 999 * width), int(box[1] / 999 * height)
        x1, y1 = int(box[2] / 999 * width) + 1, int(box[3] / 999 * height) + 1
        painted = image.copy()
        painted[y0:y1, x0:x1] = (255, 0, 255)
        plan = plan_image(image, cfg)
        assert plan_image(painted, cfg) == plan, "painting moved the ROI"
        change = np.abs(patchify(painted, cfg).pixel_values - patchify(image, cfg).pixel_values).max(axis=1)
        cells = change.reshape(plan.num_tiles, grid, 16, grid, 16).max(axis=(2, 4)).reshape(-1)
        marked = token_targets(plan, (width, height), [box], grid) == 1
        assert marked[cells > 0.5].all(), f"{box}: a cell the box clearly covers is not marked"
        assert (cells[marked] > 0.01).all(), f"{box}: a marked cell the box does not touch"


def test_parse_boxes_reads_internvl_grounding() -> None:
    assert parse_boxes("<ref>drusen</ref><box>[[1,2,3,4], [10, 20, 30, 40]]</box>") == [(1, 2, 3, 4), (10, 20, 30, 40)]
    assert parse_boxes("None.") == []


def _spot_samples(root: Path, count: int) -> list[Sample]:
    """56 px images with one bright spot; the only supervision is a grounding answer giving its box."""
    rng = np.random.default_rng(1)
    samples = []
    for i in range(count):
        image = np.full((56, 56, 3), 40, np.uint8)
        x, y = (int(v) for v in rng.integers(0, 48, 2))
        image[y:y + 8, x:x + 8] = 230
        source = root / f"spot-{i}.png"
        Image.fromarray(image).save(source)
        tiles = root / f"spot-{i}.npy"
        np.save(tiles, ((image.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)[None])
        box = [round(v * 1000 / 56) for v in (x, y, x + 7, y + 7)]
        answer = f"<ref>spot</ref><box>[[{box[0]},{box[1]},{box[2]},{box[3]}]]</box>"
        samples.append(Sample(f"g{i}", [tiles], np.zeros(1, np.int64), np.zeros(1, np.int64),
                              (("<image>\nLocate the spot.", answer),), (source,)))
    return samples


def test_vision_warm_up_learns_where_grounding_boxes_are(work, tmp_path: Path) -> None:
    samples = _spot_samples(tmp_path, 48)
    assert grounding_questions(samples) == ["Locate the spot."] and closed_questions(samples) == {}
    model = load(work["base"])
    recall = warm_up_vision(model, samples, steps=60, batch_size=16, lr=3e-3, seed=0,
                            device=torch.device("cpu"), log=lambda line: None)
    assert recall["Locate the spot."] >= 0.9, recall


def test_closed_question_coverage_counts_images_not_samples(tmp_path: Path) -> None:
    """One question per record, six kinds: each closed question covers every image but 1/6 of the samples."""
    samples = []
    for i in range(10):
        tiles = [tmp_path / f"img-{i}.npy"]
        for kind in range(6):
            answer = ("Yes", "No")[(i + kind) % 2]
            samples.append(Sample(f"q{i}-{kind}", tiles, np.zeros(1, np.int64), np.zeros(1, np.int64),
                                  ((f"<image>\nQuestion {kind}?", answer),)))
    assert sorted(closed_questions(samples)) == [f"Question {kind}?" for kind in range(6)]


def test_vision_warm_up_refuses_images_with_different_tile_counts(work, tmp_path: Path) -> None:
    samples = []
    for i, tiles in enumerate((1, 2) * 4):
        path = tmp_path / f"tiles-{i}.npy"
        np.save(path, np.zeros((tiles, 3, 56, 56), np.float32))
        samples.append(Sample(f"t{i}", [path], np.zeros(1, np.int64), np.zeros(1, np.int64),
                              (("<image>\nWhich side?", ("Left", "Right")[i % 2]),)))
    with pytest.raises(ValueError, match="one tile count for every image"):
        warm_up_vision(load(work["base"]), samples, steps=1, batch_size=2, lr=1e-3, seed=0,
                       device=torch.device("cpu"), log=lambda line: None)

"""Study-level encoding: several images' tiles batched through vision and connector, against the reference of
one image per call (the same features within fp tolerance, the same answers and item probabilities)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fundusrt.config import GenerationConfig
from fundusrt.runtime.pipeline import DEFAULT_MAX_TILES_PER_CALL, Pipeline, load_package

pytest.importorskip("torch")

# images of different shapes, so that they get different tile counts (anyres and InternVL grids)
SHAPES = [(90, 130), (200, 60), (64, 64), (150, 310), (120, 90)]


class _CountingSession:
    """A session that records the tiles of each call."""

    def __init__(self, session) -> None:
        self.session, self.calls = session, []

    def run(self, inputs):
        self.calls.append(next(iter(inputs.values())).shape[0])
        return self.session.run(inputs)


@pytest.fixture(scope="module", params=["siglip-dense", "internvit-shuffle"])
def pipe(request, tiny_package) -> Iterator[Pipeline]:
    pipeline = load_package(tiny_package(request.param, seed=0)[1], threads=1)
    pipeline.sessions.vision = _CountingSession(pipeline.sessions.vision)
    yield pipeline


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for shape in SHAPES]


def test_batched_features_equal_one_image_at_a_time(pipe: Pipeline) -> None:
    images = _images()
    reference = [pipe.encode_image(image) for image in images]
    counts = [r.num_tiles for r in reference]
    assert len(set(counts)) > 1, counts  # the split back per image is exercised with unequal images
    for bound in (sum(counts), max(counts) + min(counts), 1):
        pipe.sessions.vision.calls.clear()
        batched = pipe.encode_images(images, max_tiles_per_call=bound)
        for mine, ref in zip(batched, reference, strict=True):
            assert mine.num_tiles == ref.num_tiles
            np.testing.assert_allclose(mine.image_embeds, ref.image_embeds, rtol=1e-4, atol=1e-5)
        # consecutive images share a call while they fit; an image larger than the bound goes alone
        calls = pipe.sessions.vision.calls
        if bound == sum(counts):
            assert calls == [sum(counts)]
        elif bound == 1:
            assert calls == counts
        else:
            assert sum(calls) == sum(counts) and len(calls) < len(images) and max(calls) <= bound
    with pytest.raises(ValueError, match="at least 1"):
        pipe.encode_images(images, max_tiles_per_call=0)


def test_run_study_batched_gives_the_answers_of_one_image_at_a_time(pipe: Pipeline, tmp_path: Path) -> None:
    from fundusrt.dicom import read_study
    from fundusrt.synth import write_study

    study = read_study(write_study(tmp_path / "study", seed=3, size=(320, 256)).out_dir)
    gen, questions = GenerationConfig(max_new_tokens=6), ["Is the optic disc normal?"]
    assert pipe.max_tiles_per_call == DEFAULT_MAX_TILES_PER_CALL
    try:
        pipe.max_tiles_per_call = 1
        pipe.sessions.vision.calls.clear()
        alone = pipe.run_study(study, questions, gen)
        alone_calls = len(pipe.sessions.vision.calls)
        pipe.max_tiles_per_call = 10_000
        pipe.sessions.vision.calls.clear()
        together = pipe.run_study(study, questions, gen)
    finally:
        pipe.max_tiles_per_call = DEFAULT_MAX_TILES_PER_CALL
    gradable = sum(r.num_tiles > 0 for r in alone.images)
    assert gradable >= 2 and alone_calls == gradable and len(pipe.sessions.vision.calls) == 1
    assert [r.sop_instance_uid for r in together.images] == [r.sop_instance_uid for r in alone.images]
    for mine, ref in zip(together.images, alone.images, strict=True):
        assert (mine.num_tiles, mine.gradable) == (ref.num_tiles, ref.gradable)
        assert [a.answer for a in mine.answers] == [a.answer for a in ref.answers]
        assert mine.items.keys() == ref.items.keys()
        for item_id, result in mine.items.items():
            assert result["answer"] == ref.items[item_id]["answer"]
            for option, p in result["probabilities"].items():
                assert p == pytest.approx(ref.items[item_id]["probabilities"][option], abs=1e-5)
    assert together.screening["decision"] == alone.screening["decision"]


def test_run_tiles_per_call_option(tiny_package, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`fundusrt run --tiles-per-call 1` reports what the default batched run reports; 0 is refused."""
    import json

    from fundusrt.cli import main
    from fundusrt.synth import write_study

    package = tiny_package("siglip-dense", seed=0)[1]
    study = write_study(tmp_path / "study", seed=4, size=(320, 256)).out_dir
    reports = []
    for extra in ([], ["--tiles-per-call", "1"]):
        out = tmp_path / f"report{len(reports)}.json"
        assert main(["run", str(study), "--package", str(package), "--max-new-tokens", "4", "--json", str(out),
                     *extra]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["eyes"] and reports[0]["screening"]["decision"] == reports[1]["screening"]["decision"]
    for eye in reports[0]["eyes"]:
        for item_id, item in reports[0]["eyes"][eye]["items"].items():
            other = reports[1]["eyes"][eye]["items"][item_id]
            assert item["answer"] == other["answer"]
            assert item["probabilities"] == pytest.approx(other["probabilities"], abs=1e-5)
    capsys.readouterr()
    assert main(["run", str(study), "--package", str(package), "--tiles-per-call", "0"]) == 1
    assert "--tiles-per-call must be at least 1" in capsys.readouterr().err

"""The ONNX Runtime backend and Pipeline against the PyTorch reference model, on tiny random packages."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fundusrt.config import GenerationConfig
from fundusrt.kernels import patchify
from fundusrt.manifest import Manifest, PackageError
from fundusrt.prompt import PromptError, build_input_ids
from fundusrt.runtime.backends.base import BackendError, available_backends
from fundusrt.runtime.generation import generate_tokens
from fundusrt.runtime.pipeline import NoFundusImageError, Pipeline, load_package
from fundusrt.runtime.sampling import make_sampler

torch = pytest.importorskip("torch")

QUESTION = "Describe the optic disc."
PARITY_TOKENS = 40


@pytest.fixture(scope="module")
def built(tiny_package) -> tuple[Path, Path]:
    return tiny_package("siglip-dense", seed=0)


@pytest.fixture(scope="module")
def pipe(built: tuple[Path, Path]) -> Pipeline:
    return load_package(built[1], threads=1)


@pytest.fixture(scope="module")
def reference(built: tuple[Path, Path]):
    from fundusrt.models import load

    return load(built[0])


def _image(seed: int = 0, shape: tuple[int, int] = (90, 130)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*shape, 3), dtype=np.uint8)


def _prompt(pipe: Pipeline, image: np.ndarray, question: str = QUESTION) -> tuple[np.ndarray, np.ndarray]:
    patches = patchify(image, pipe.manifest.preprocessing)
    counts = [patches.num_tiles * pipe.manifest.prompt.tokens_per_tile]
    return patches.pixel_values, build_input_ids(pipe.manifest.prompt, pipe.tokenizer, question, counts)


def test_components_match_reference(pipe: Pipeline, reference) -> None:
    pixel_values, ids = _prompt(pipe, _image())
    with torch.inference_mode():
        ref_image = reference.image_embeds(torch.from_numpy(pixel_values)).numpy()
        ref_embeds = reference.prompt_embeds(torch.from_numpy(ids)[None], torch.from_numpy(pixel_values)).numpy()
    encoded = pipe.encode_image(_image())
    diff = float(np.abs(encoded.image_embeds - ref_image.reshape(-1, ref_image.shape[-1])).max())
    assert diff < 1e-4, f"vision+connector max abs diff {diff:.3g}"
    _, embeds = pipe.prompt_embeds(encoded, QUESTION)
    diff = float(np.abs(embeds - ref_embeds).max())
    assert diff < 1e-4, f"spliced prompt embeddings max abs diff {diff:.3g}"


def test_ort_greedy_tokens_match_pytorch_reference(pipe: Pipeline, reference) -> None:
    image = _image(1)
    pixel_values, ids = _prompt(pipe, image)
    expected = reference.generate(ids, torch.from_numpy(pixel_values), max_new_tokens=PARITY_TOKENS,
                                  stop_token_ids=[])
    encoded = pipe.encode_image(image)
    _, embeds = pipe.prompt_embeds(encoded, QUESTION)
    decoder = pipe.sessions.decoder
    decoder.reset()
    ours = list(generate_tokens(decoder, embeds, make_sampler(), max_new_tokens=PARITY_TOKENS))
    assert len(set(expected)) > 3, "the tiny model should not repeat one token"
    assert ours == expected, f"first difference at {next(i for i, (a, b) in enumerate(zip(ours, expected)) if a != b)}"
    # Through the public API, stops included: the reference keeps its stop token, we drop it.
    stops = set(pipe.manifest.prompt.stop_token_ids)
    with_stops = reference.generate(ids, torch.from_numpy(pixel_values), max_new_tokens=PARITY_TOKENS)
    answer = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=PARITY_TOKENS))
    assert answer.token_ids == [t for t in with_stops if t not in stops]
    assert answer.text == pipe.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
    assert answer.num_tiles == len(pixel_values)
    stages = {"patchify_ms", "vision_ms", "connector_ms", "prefill_ms", "decode_ms", "tokens_per_s"}
    assert stages <= set(answer.timings)


def test_fork_and_reset(pipe: Pipeline) -> None:
    encoded = pipe.encode_image(_image(2))
    _, embeds = pipe.prompt_embeds(encoded, QUESTION)
    decoder = pipe.sessions.decoder
    decoder.reset()
    assert decoder.seq_len == 0
    first = decoder.prefill(embeds)
    prompt_len = decoder.seq_len
    assert prompt_len == embeds.shape[1]
    fork = decoder.fork()
    token = int(np.argmax(first))
    forked_steps = [fork.decode(token) for _ in range(3)]
    assert fork.seq_len == prompt_len + 3 and decoder.seq_len == prompt_len  # the fork's steps stay its own
    np.testing.assert_array_equal(decoder.decode(token), forked_steps[0])  # the original continues unchanged
    decoder.reset()
    assert decoder.seq_len == 0
    np.testing.assert_allclose(decoder.prefill(embeds), first, atol=1e-5)


def test_ask_many_shares_the_prompt_prefix(pipe: Pipeline) -> None:
    image, questions = _image(3), ["Is the disc pale?", "Any haemorrhages in the macula?"]
    gen = GenerationConfig(max_new_tokens=12)
    together = pipe.ask_many(image, questions, gen)
    alone = [pipe.ask(image, q, gen) for q in questions]
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert together[0].timings["shared_prefill_ms"] > 0 and alone[0].timings["shared_prefill_ms"] == 0


def test_streaming_and_stop_strings(pipe: Pipeline) -> None:
    image = _image(4)
    full = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=24))
    pieces: list[str] = []
    streamed = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=24), on_token=pieces.append)
    assert "".join(pieces) == streamed.text == full.text
    # A stop string of plain letters from the second half (random models also emit partial UTF-8).
    windows = [full.text[i:i + 3] for i in range(len(full.text) // 2, len(full.text) - 2)]
    stop = next((w for w in windows if w.isascii() and w.isalpha()), None)
    assert stop, f"need plain text to stop on, got {full.text!r}"
    cut = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=24, stop_strings=[stop]))
    assert cut.finish_reason == "stop_string" and cut.text == full.text[:full.text.find(stop)]
    sampled = [pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=10, temperature=1.0, top_k=20, seed=9))
               for _ in range(2)]
    assert sampled[0].token_ids == sampled[1].token_ids


def test_decode_steps_count_the_step_that_produced_the_stop_token(pipe: Pipeline) -> None:
    image = _image(4)
    full = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=12))
    assert full.finish_reason == "length" and full.timings["decode_steps"] == len(full.token_ids) - 1
    k = full.token_ids.index(full.token_ids[5])  # where that token first appears
    cut = pipe.ask(image, QUESTION, GenerationConfig(max_new_tokens=12, stop_token_ids=[full.token_ids[5]]))
    assert cut.finish_reason == "stop_token" and cut.token_ids == full.token_ids[:k]
    # one token from prefill, k - 1 decoded into the answer, one decoded stop token
    assert cut.timings["decode_steps"] == k


def test_run_study_report(pipe: Pipeline, tmp_path: Path) -> None:
    from fundusrt.dicom import read_study
    from fundusrt.synth import write_study

    study_dir = write_study(tmp_path / "study", seed=0, size=(320, 256)).out_dir
    study = read_study(study_dir)
    questions = ["Is the optic disc normal?", "Grade the retinopathy."]
    report = pipe.run_study(study_dir, questions, GenerationConfig(max_new_tokens=6))
    data = json.loads(report.write_json(tmp_path / "report.json").read_text())
    assert len(data["images"]) == len(study.images) > 0
    for entry, image in zip(data["images"], study.images, strict=True):
        assert (entry["sop_instance_uid"], entry["frame_index"]) == (image.sop_instance_uid, image.frame_index)
        assert entry["laterality"] == image.laterality
        assert entry["num_tiles"] == patchify(image.pixels, pipe.manifest.preprocessing).num_tiles
        assert [a["question"] for a in entry["answers"]] == questions
        assert all(isinstance(a["answer"], str) for a in entry["answers"])
    lateralities = {i.laterality or "unknown" for i in study.images}
    assert set(data["eyes"]) == lateralities
    for eye in data["eyes"].values():
        assert questions[0] in eye["report"]
    assert data["errors"] == [{"file": str(f.file), "status": f.status, "reason": f.reason} for f in study.errors()]
    assert data["package"]["manifest_sha256"] == pipe.manifest_sha256
    text = report.render_text()
    assert questions[1] in text and (study.study_instance_uid or "") in text


def test_tampered_package_is_refused(built: tuple[Path, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built[1], tmp_path / "pkg"))
    target = copy / Manifest.load(copy).components["decoder"].file
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(PackageError, match=r"decoder.*sha256"):
        load_package(copy)


def test_unknown_backend(built: tuple[Path, Path]) -> None:
    assert "ort-cpu" in available_backends()
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        load_package(built[1], backend="nope")


def test_prompt_longer_than_package_allows(built: tuple[Path, Path], tmp_path: Path) -> None:
    copy = Path(shutil.copytree(built[1], tmp_path / "pkg"))
    manifest = Manifest.load(copy)
    manifest.decoder.max_seq_len = 30
    manifest.save(copy)
    small = load_package(copy, threads=1)
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens .* allows 30"):
        small.ask(_image(), QUESTION)


def _write_non_fundus_study(folder: Path) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir()
    (folder / "corrupt.dcm").write_bytes(b"DICM" + bytes(range(256)) * 4)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: no pixels
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "SR"
    ds.save_as(folder / "report.dcm", enforce_file_format=True)
    return folder


def test_study_without_fundus_images(pipe: Pipeline, tmp_path: Path) -> None:
    folder = _write_non_fundus_study(tmp_path / "study")
    with pytest.raises(NoFundusImageError) as info:
        pipe.run_study(folder)
    message = str(info.value)
    assert "no fundus image" in message and "corrupt.dcm" in message and "report.dcm" in message


def test_cli_reports_errors_in_one_line(built: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from fundusrt.cli import main

    folder = _write_non_fundus_study(tmp_path / "study")
    assert main(["run", str(folder), "--package", str(built[1]), "--threads", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fundusrt run: error: the study has no fundus image") and "\n" not in err
    assert main(["run", str(folder), "--package", str(tmp_path / "missing")]) == 1
    assert "not a model package" in capsys.readouterr().err

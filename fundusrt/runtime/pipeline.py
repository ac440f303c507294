"""The Python API: load a model package, ask questions about fundus images, run whole DICOM studies.

    pipe = fundusrt.load_package("pkg/")
    answer = pipe.ask(image_uint8_hwc, "Is there diabetic retinopathy?")
    report = pipe.run_study("study_dir/")
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from fundusrt import __version__
from fundusrt.config import GenerationConfig
from fundusrt.dicom import Study, read_study
from fundusrt.dicom.gradability import assess_gradability
from fundusrt.manifest import MANIFEST_NAME, Manifest, PackageError, sha256_file
from fundusrt.prompt import PromptError, build_input_ids
from fundusrt.runtime.assembly import ANYRES_MAX_KEY, assemble_anyres_unpad, load_image_newline
from fundusrt.runtime.backends.base import DecoderSession, PackageSessions, host_patchify, open_package
from fundusrt.runtime.generation import TextStream, generate_tokens
from fundusrt.runtime.protocol import (
    DEFAULT_PROTOCOL,
    PROTOCOL_NAME,
    Protocol,
    gradability_item_reason,
    item_result,
    load_protocol,
    model_laterality,
    option_token_ids,
    probabilities,
    screen_eye,
    screening_summary,
)
from fundusrt.runtime.report import UNKNOWN_EYE, FileError, ImageResult, QuestionAnswer, StudyReport
from fundusrt.runtime.sampling import sampler_from_config

# Asked when neither the caller nor the package names questions.
DEFAULT_QUESTIONS = (
    "Describe the findings in this fundus photograph.",
    "What is the diabetic retinopathy grade of this eye?",
)
SUPPORTED_IMAGE_LAYOUTS = ("flat", "anyres_unpad")
# Most tiles per vision/connector call when a study's images are encoded together: the activations of a
# call grow with its tiles (a ViT-L tile at 448 px holds about 0.3 GB of fp32 activations at its widest),
# so the bound caps memory while still amortising the per-call overhead over several images.
DEFAULT_MAX_TILES_PER_CALL = 16


class NoFundusImageError(ValueError):
    """A study holds no usable fundus image."""


@dataclass
class Answer:
    """A generated answer with its ids and per-stage timings (ms; `tokens_per_s` for decoding)."""

    text: str
    token_ids: list[int]
    num_tiles: int
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class ItemScore:
    """A closed protocol item scored on one image.

    Attributes:
        log_likelihoods: per option, the sum of the log-softmax of its tokens after the prompt.
        probabilities: the same normalised over the item's options (they sum to 1).
    """

    item_id: str
    log_likelihoods: dict[str, float]
    probabilities: dict[str, float]
    scoring_ms: float = 0.0


# (item id, question, option answers, their token ids): an item ready to score
_ScoringTask = tuple[str, str, list[str], list[list[int]]]


@dataclass
class EncodedImage:
    """An image's feature tokens, ready to splice into a prompt, with the stage timings."""

    image_embeds: np.ndarray  # (image tokens, hidden), tiles in order
    num_tiles: int
    timings: dict[str, float]


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    values = logits.astype(np.float64)
    shifted = values - values.max()
    return shifted - np.log(np.exp(shifted).sum())


def _common_prefix(sequences: Sequence[np.ndarray]) -> int:
    shortest = min(len(s) for s in sequences)
    first = sequences[0][:shortest]
    same = np.ones(shortest, dtype=bool)
    for s in sequences[1:]:
        same &= s[:shortest] == first
    return shortest if same.all() else int(np.argmin(same))


class Pipeline:
    """A loaded model package: sessions created once, reused for every image and question."""

    def __init__(self, package_dir: Path, manifest: Manifest, sessions: PackageSessions, tokenizer: Tokenizer,
                 manifest_sha256: str, image_newline: np.ndarray | None = None,
                 protocol: Protocol | None = None, max_tiles_per_call: int = DEFAULT_MAX_TILES_PER_CALL) -> None:
        self.package_dir = package_dir
        # bound on the tiles of one vision/connector call when run_study encodes several images at once
        # (an image with more tiles than this still goes alone); 1 encodes one image at a time
        self.max_tiles_per_call = max_tiles_per_call
        # the screening protocol run_study scores (see load_package for which one)
        self.protocol = protocol or load_protocol(DEFAULT_PROTOCOL)
        self.image_newline = image_newline
        self.manifest = manifest
        self.sessions = sessions
        self.tokenizer = tokenizer
        self.manifest_sha256 = manifest_sha256

    @property
    def default_questions(self) -> list[str]:
        """What is asked when the caller names no question: the package's list, else DEFAULT_QUESTIONS."""
        return list(self.manifest.default_questions or DEFAULT_QUESTIONS)

    def package_info(self) -> dict[str, object]:
        """Identity of the package and backend, as written into reports."""
        m = self.manifest
        return {"name": m.name, "family": m.family, "precision": m.precision, "manifest_sha256": self.manifest_sha256,
                "backend": self.sessions.backend, "fundusrt_version": __version__}

    def ask(self, image: np.ndarray, question: str, gen: GenerationConfig | None = None,
            on_token: Callable[[str], None] | None = None) -> Answer:
        """Answer one question about one image.

        Args:
            image: (H, W, 3) uint8 RGB.
            question: the user text (an image placeholder is added when it has none).
            gen: decoding settings (default: greedy, 128 new tokens).
            on_token: called with each new piece of answer text as it is generated.
        """
        return self.ask_many(image, [question], gen, on_token)[0]

    def ask_many(self, image: np.ndarray, questions: Sequence[str], gen: GenerationConfig | None = None,
                 on_token: Callable[[str], None] | None = None) -> list[Answer]:
        """Answer several questions about one image, encoding the image and prefilling the shared prompt once.

        The prompt up to the first difference between questions (system text, image tokens) is
        prefilled once and each question continues from a fork of that cache.
        """
        if not questions:
            raise ValueError("no questions to ask")
        return self._answer_and_score(self.encode_image(image), questions, [], gen or GenerationConfig(), on_token)[0]

    def score(self, image: np.ndarray, protocol: Protocol | None = None) -> dict[str, ItemScore]:
        """The probability of every option of every item of a protocol (default: the pipeline's) on one image.

        Raises:
            ProtocolError: the protocol does not fit this package.
        """
        tasks = self._scoring_tasks(protocol or self.protocol)
        return self._answer_and_score(self.encode_image(image), [], tasks, GenerationConfig(), None)[1]

    def _scoring_tasks(self, protocol: Protocol) -> list[_ScoringTask]:
        option_ids = option_token_ids(protocol, self.manifest.prompt, self.tokenizer,
                                      self.manifest.decoder.max_seq_len, self.manifest.name)
        return [(item.id, item.question, item.answers, option_ids[item.id]) for item in protocol.items]

    def _answer_and_score(self, encoded: EncodedImage, questions: Sequence[str], tasks: Sequence[_ScoringTask],
                          gen: GenerationConfig, on_token: Callable[[str], None] | None,
                          ) -> tuple[list[Answer], dict[str, ItemScore]]:
        """Free-text answers to `questions` and option scores of `tasks` (item id order), all on one image.

        The prompt up to the first difference between all prompts (system text, image tokens) is
        prefilled once; each question and item continues from a fork of that cache. An option's first
        token is scored from the item prompt's logits; the later tokens of all multi-token options of
        an item advance together, in batched decoder calls from the item prompt's cache
        (`DecoderSession.continuation_logits`).
        """
        prompts = [self.prompt_embeds(encoded, q) for q in [t[1] for t in tasks] + list(questions)]
        shared = _common_prefix([ids for ids, _ in prompts]) if len(prompts) > 1 else 0
        shared = min(shared, min(len(ids) for ids, _ in prompts) - 1)  # each prompt prefills >= 1 token
        decoder = self.sessions.decoder
        decoder.reset()
        prefix_ms = 0.0
        if shared > 0:
            start = time.perf_counter()
            decoder.prefill(prompts[0][1][:, :shared])
            prefix_ms = _ms(start)

        def continuation() -> DecoderSession:
            if shared > 0:
                return decoder.fork()
            decoder.reset()
            return decoder

        scores = {}
        for (_, embeds), (item_id, _, options, option_ids) in zip(prompts[:len(tasks)], tasks, strict=True):
            start = time.perf_counter()
            item_session = continuation()
            first = _log_softmax(item_session.prefill(embeds[:, shared:]))
            # token k of an option is scored from the logits after its tokens before k
            longer = [ids for ids in option_ids if len(ids) > 1]
            later = iter(item_session.continuation_logits([ids[:-1] for ids in longer]) if longer else [])
            log_likelihoods = {}
            for option, ids in zip(options, option_ids, strict=True):
                total = float(first[ids[0]])
                if len(ids) > 1:
                    rows = next(later)
                    total += sum(float(_log_softmax(row)[token]) for row, token in zip(rows, ids[1:], strict=True))
                log_likelihoods[option] = total
            probs = probabilities(list(log_likelihoods.values()))
            scores[item_id] = ItemScore(item_id, log_likelihoods, dict(zip(options, probs.tolist(), strict=True)),
                                        _ms(start))
        answers = []
        for (ids, embeds), question in zip(prompts[len(tasks):], questions, strict=True):
            answer = self._generate(continuation(), ids, embeds[:, shared:], encoded.num_tiles, gen, on_token)
            answer.timings = {**encoded.timings, "shared_prefill_ms": prefix_ms, **answer.timings}
            answers.append(answer)
        return answers, scores

    def run_study(self, source: str | Path | Sequence[str | Path] | Study, questions: Sequence[str] | None = None,
                  gen: GenerationConfig | None = None) -> StudyReport:
        """Screen every fundus image of a study with the pipeline's protocol, answer the free-text questions,
        and assemble the report with the per-eye and patient decisions.

        Each image first goes through the pixel gradability checks; a gradable one has every protocol
        item scored and the questions answered, all from one encoding and one shared prefill.
        An image with neither a laterality tag nor a confident picture reading takes the eye its
        protocol laterality item gives when the model is sure enough (`protocol.model_laterality`).

        Args:
            source: a DICOM file, a folder, a list of files, or an already read Study.
            questions: free-text questions; default: the protocol's report questions, else those of the
                package's default questions (or DEFAULT_QUESTIONS) that the protocol does not already score.
            gen: decoding settings.

        Raises:
            NoFundusImageError: the study has no fundus image, or none could be answered; the
                message says why for each file.
            ProtocolError: the protocol does not fit this package.
        """
        start = time.perf_counter()
        study = source if isinstance(source, Study) else read_study(source)
        protocol = self.protocol
        tasks = self._scoring_tasks(protocol)
        scored = {item.question for item in protocol.items}
        questions = list(questions or protocol.report_questions
                         or [q for q in self.default_questions if q not in scored])
        gen = gen or GenerationConfig()
        errors = [FileError(str(f.file), f.status, f.reason) for f in study.errors()]
        if not study.images:
            detail = "; ".join(f"{e.file}: {e.status}: {e.reason}" for e in errors) or "no files were found"
            raise NoFundusImageError(f"the study has no fundus image ({detail})")
        # the pixel checks come first: a model shown an unusable picture still answers, and its
        # answers would pass for a normal eye
        grades = [assess_gradability(image.pixels) for image in study.images]
        # every gradable image's tiles go through the vision tower together, up to max_tiles_per_call
        encodings = iter(self._encode_study([im.pixels for im, g in zip(study.images, grades, strict=True)
                                             if g.gradable]))
        results = []
        for image, grade in zip(study.images, grades, strict=True):
            image_start = time.perf_counter()
            asked, answers, items, num_tiles, scoring_ms = [], [], {}, 0, 0.0
            try:
                if grade.gradable:
                    asked = questions
                    encoded = next(encodings)
                    if isinstance(encoded, ValueError):
                        raise encoded
                    answers, scores = self._answer_and_score(encoded, asked, tasks, gen, None)
                    num_tiles = encoded.num_tiles
                    items = {s.item_id: item_result(protocol.item(s.item_id), s.probabilities) for s in scores.values()}
                    scoring_ms = sum(s.scoring_ms for s in scores.values())
            except ValueError as exc:  # PromptError included: one unusable image must not sink the study
                errors.append(FileError(str(image.source), "error", f"image {image.sop_instance_uid}: {exc}"))
                continue
            model_says = gradability_item_reason(protocol, items)
            gradable = grade.gradable and model_says is None
            laterality, laterality_source, model_p = image.laterality, image.laterality_source, None
            # no tag and no confident picture reading: the model's own answer, when it is sure enough
            # (the answers of an image it found ungradable are not used for anything else either)
            placed = model_laterality(protocol, items) if laterality is None and gradable else None
            if placed:
                laterality, model_p = placed
                laterality_source = "model"
            results.append(ImageResult(
                sop_instance_uid=image.sop_instance_uid, series_instance_uid=image.series_instance_uid,
                frame_index=image.frame_index, laterality=laterality, source=str(image.source),
                num_tiles=num_tiles,
                answers=[QuestionAnswer(q, a.text, len(a.token_ids), a.finish_reason, a.timings)
                         for q, a in zip(asked, answers, strict=True)],
                timings={"scoring_ms": scoring_ms, "total_ms": _ms(image_start)},
                laterality_source=laterality_source, image_laterality=image.image_laterality,
                image_laterality_confidence=image.image_laterality_confidence,
                laterality_mismatch=image.laterality_mismatch, model_laterality_probability=model_p,
                gradable=gradable, items=items,
                gradability_reasons=grade.reasons + ([model_says] if model_says else []),
            ))
        if not results:
            raise NoFundusImageError("no fundus image of the study could be answered: "
                                     + "; ".join(f"{e.file}: {e.reason}" for e in errors))
        by_eye: dict[str, list[dict]] = {}
        for result in results:
            by_eye.setdefault(result.laterality or UNKNOWN_EYE, []).append(
                {"gradable": result.gradable, "items": result.items})
        eyes = {eye: screen_eye(protocol, entries) for eye, entries in by_eye.items()}
        return StudyReport(study_instance_uid=study.study_instance_uid, package=self.package_info(),
                           images=results, errors=errors, timings={"total_ms": _ms(start)},
                           screening=screening_summary(protocol, [e["decision"] for e in eyes.values()]),
                           eye_screening=eyes)

    def encode_image(self, image: np.ndarray) -> EncodedImage:
        """Patchify, vision and connector (plus any anyres assembly): the image's feature tokens."""
        return self.encode_images([image], max_tiles_per_call=1)[0]

    def encode_images(self, images: Sequence[np.ndarray], max_tiles_per_call: int | None = None,
                      ) -> list[EncodedImage]:
        """Encode several images, their tiles batched through vision and connector, split back per image.

        Consecutive images share a call while their tiles fit in `max_tiles_per_call` (default: the
        pipeline's `max_tiles_per_call`); an image with more tiles goes alone. Every tile is encoded
        independently of the others in its call, so the features are those of `encode_image` on each
        image (up to the float rounding of a larger matrix product). Each image's vision and connector
        timings are its share of its call's, in proportion to its tiles.
        """
        bound = self.max_tiles_per_call if max_tiles_per_call is None else max_tiles_per_call
        if bound < 1:
            raise ValueError(f"max_tiles_per_call must be at least 1, got {bound}")
        if self.sessions.patchify is not host_patchify:
            # a backend's own patching leaves the tiles in device memory, where they cannot be joined here
            bound = 1
        encoded: list[EncodedImage] = []
        pending: list[tuple[Any, float]] = []  # (patches, patchify ms) of the next call
        with contextlib.ExitStack() as held:  # what the pending patches hold, freed once their call has run
            for image in images:
                start = time.perf_counter()
                with contextlib.ExitStack() as current:
                    patches = current.enter_context(self.sessions.patchify(image, self.manifest.preprocessing))
                    patchify_ms = _ms(start)
                    if pending and sum(p.num_tiles for p, _ in pending) + patches.num_tiles > bound:
                        encoded += self._encode_call(pending)
                        held.close()
                        pending = []
                    held.enter_context(current.pop_all())
                pending.append((patches, patchify_ms))
            if pending:
                encoded += self._encode_call(pending)
        return encoded

    def _encode_call(self, batch: Sequence[tuple[Any, float]]) -> list[EncodedImage]:
        """One vision and one connector call over the tiles of `batch` ((patches, patchify ms) per image)."""
        vision, connector = self.manifest.components["vision"], self.manifest.components["connector"]
        counts = [patches.num_tiles for patches, _ in batch]
        pixels = (batch[0][0].pixel_values if len(batch) == 1
                  else np.concatenate([patches.pixel_values for patches, _ in batch]))
        start = time.perf_counter()
        features = self.sessions.vision.run({vision.inputs[0].name: pixels})[vision.outputs[0].name]
        vision_ms = _ms(start)
        start = time.perf_counter()
        embeds = self.sessions.connector.run({connector.inputs[0].name: features})[connector.outputs[0].name]
        connector_ms = _ms(start)
        encoded, first = [], 0
        for (patches, patchify_ms), count in zip(batch, counts, strict=True):
            mine = embeds[first:first + count]
            first += count
            if self.image_newline is not None:
                tokens = assemble_anyres_unpad(mine, patches.plan, self.image_newline,
                                               int(self.manifest.extra.get(ANYRES_MAX_KEY, 0)))
            else:
                tokens = mine.reshape(-1, mine.shape[-1])
            share = count / sum(counts)
            encoded.append(EncodedImage(tokens, count, {"patchify_ms": patchify_ms, "vision_ms": vision_ms * share,
                                                        "connector_ms": connector_ms * share}))
        return encoded

    def _encode_study(self, images: Sequence[np.ndarray]) -> list[EncodedImage | ValueError]:
        """`encode_images`, or when that fails, each image alone so that only the bad one reports its error."""
        try:
            return list(self.encode_images(images))
        except ValueError:
            pass
        encoded: list[EncodedImage | ValueError] = []
        for image in images:
            try:
                encoded.append(self.encode_image(image))
            except ValueError as exc:
                encoded.append(exc)
        return encoded

    def prompt_embeds(self, encoded: EncodedImage, question: str) -> tuple[np.ndarray, np.ndarray]:
        """Prompt ids and their embeddings with the image features spliced at the image-token positions."""
        spec, limit = self.manifest.prompt, self.manifest.decoder.max_seq_len
        ids = build_input_ids(spec, self.tokenizer, question, [len(encoded.image_embeds)])
        if len(ids) >= limit:
            raise PromptError(
                f"the prompt is {len(ids)} tokens ({len(encoded.image_embeds)} image tokens for {encoded.num_tiles} "
                f"tiles) but package {self.manifest.name!r} allows {limit} (prompt plus answer); "
                "use a shorter question or an image that needs fewer tiles")
        embed = self.manifest.components["embed"]
        embeds = self.sessions.embed.run({embed.inputs[0].name: ids[None]})[embed.outputs[0].name]
        positions = ids == spec.image_token_id
        if int(positions.sum()) != len(encoded.image_embeds):
            raise PromptError(f"the prompt has {int(positions.sum())} image tokens for "
                              f"{len(encoded.image_embeds)} image features; the question must not contain "
                              f"the image token {spec.image_token!r}")
        embeds[0, positions] = encoded.image_embeds.astype(embeds.dtype, copy=False)
        return ids, embeds

    def _generate(self, decoder: DecoderSession, ids: np.ndarray, embeds: np.ndarray, num_tiles: int,
                  gen: GenerationConfig, on_token: Callable[[str], None] | None) -> Answer:
        max_new = min(gen.max_new_tokens, self.manifest.decoder.max_seq_len - len(ids))
        stops = set(self.manifest.prompt.stop_token_ids) | set(gen.stop_token_ids)
        stream = TextStream(self.tokenizer, gen.stop_strings, on_token)
        tokens = generate_tokens(decoder, embeds, sampler_from_config(gen), max_new_tokens=max_new,
                                 stop_token_ids=stops, prompt_ids=ids.tolist())
        token_ids: list[int] = []
        start = time.perf_counter()
        first_ms = 0.0
        for token in tokens:
            if not token_ids:
                first_ms = _ms(start)
            token_ids.append(token)
            if stream.push(token):
                tokens.close()
                break
        total_ms = _ms(start)
        if not token_ids:
            first_ms = total_ms
        decode_ms = total_ms - first_ms
        text = stream.finish()
        reason = "stop_string" if stream.stopped else "length" if len(token_ids) == max_new else "stop_token"
        # prefill_ms is the time to the first token; decoding speed counts the decoder steps after it,
        # the one that produced the stop token included (that token is not part of the answer)
        steps = max(len(token_ids) - 1 + (reason == "stop_token"), 0)
        return Answer(text=text, token_ids=token_ids, num_tiles=num_tiles, finish_reason=reason, timings={
            "prefill_ms": first_ms, "decode_ms": decode_ms, "prompt_tokens": float(len(ids)),
            "decode_steps": float(steps),
            "tokens_per_s": steps / (decode_ms / 1000.0) if steps > 0 and decode_ms > 0 else 0.0,
        })


def load_package(path: str | Path, backend: str = "ort-cpu", threads: int | None = None,
                 protocol: str | Path | Protocol | None = None) -> Pipeline:
    """Verify a model package (sha256 of every file) and open it with a backend.

    Args:
        path: the package directory (holding manifest.json).
        backend: a registered backend name ("ort-cpu", "ort-cuda", "ort-trt").
        threads: intra-op threads per session (None: the backend's default).
        protocol: the screening protocol (a file or a loaded one); default: the package's own
            protocol.json when it carries one, else the shipped default protocol.

    Raises:
        PackageError: the package is missing, malformed, tampered with, or uses an unsupported layout.
        BackendError: the backend is unknown or not installed here.
        ProtocolError: the protocol file is invalid.
    """
    package_dir = Path(path)
    manifest = Manifest.load(package_dir)
    manifest.verify_stamped(package_dir)  # full sha256 on first load and after any file changed
    if manifest.prompt.image_layout not in SUPPORTED_IMAGE_LAYOUTS:
        raise PackageError(f"package image_layout {manifest.prompt.image_layout!r} is not supported by this runtime "
                           f"(supported: {', '.join(SUPPORTED_IMAGE_LAYOUTS)})")
    try:
        tokenizer = Tokenizer.from_file(str(package_dir / manifest.tokenizer))
    except Exception as exc:  # tokenizers raises a bare Exception for unreadable files
        raise PackageError(f"cannot read the package tokenizer {manifest.tokenizer}: {exc}") from exc
    image_newline = load_image_newline(package_dir, manifest)
    if not isinstance(protocol, Protocol):
        own = package_dir / PROTOCOL_NAME
        protocol = load_protocol(protocol if protocol is not None else own if own.is_file() else DEFAULT_PROTOCOL)
    sessions = open_package(backend, package_dir, manifest, threads=threads)
    return Pipeline(package_dir, manifest, sessions, tokenizer, sha256_file(package_dir / MANIFEST_NAME),
                    image_newline, protocol)

"""Screening protocols: the closed questions a package answers, their codes, and the referral rule, as data.

A protocol is a versioned JSON file (the shipped default is `protocols/synthetic-screening.json`, the
questions the demo model was trained on; a package may carry its own `protocol.json`; `fundusrt run
--protocol FILE` overrides both). Each item is a question as the model was trained to be asked it, a
closed set of answer options, a code per option and a role:

- ``gradability``: ``positive`` names the options that mean "gradable";
- ``laterality``: which eye the picture shows; options coded as an eye (SNOMED CT, `EYE_CODES`) let the
  model place an image that has neither a laterality tag nor a confident picture reading
  (`model_laterality`);
- ``finding``: ``positive`` names the options that mean "present";
- ``grade``: options in increasing severity.

Per eye, an item's probabilities are those of one image, chosen by role (worst image wins, because a
clinic refers on the worst picture): ``finding`` the image with the highest P(present), ``grade`` the
image with the highest expected severity, ``gradability`` the image with the highest P(gradable);
``laterality`` averages the images. An eye is "ungradable" when none of its images passed the pixel
checks and the protocol's gradability item; otherwise it is "refer" when P(the referral item's
positive options) >= threshold, else "no_refer". The patient is "refer" when any eye refers, else
"ungradable" when any eye is ungradable, else "no_refer".

Format versions: this runtime reads `format_version` MIN_FORMAT_VERSION..FORMAT_VERSION; a newer file
is refused (it may carry rules this runtime would silently ignore), an older one too (its meaning
changed; the message says so).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fundusrt.manifest import PromptSpec
from fundusrt.prompt import TokenizerLike, build_input_ids

FORMAT = "fundusrt-protocol"
FORMAT_VERSION = 1
MIN_FORMAT_VERSION = 1
PROTOCOL_NAME = "protocol.json"  # a package's own protocol, beside its manifest
DEFAULT_PROTOCOL = Path(__file__).parent / "protocols" / "synthetic-screening.json"
ROLES = ("gradability", "laterality", "finding", "grade")
# SNOMED CT, DICOM, and the private scheme the SR declares (fundusrt.dicom.sr.PRIVATE_SCHEME)
CODE_SCHEMES = ("SCT", "DCM", "99FUNDUSRT")
_ITEM_ID = re.compile(r"[a-z][a-z0-9_]{0,63}")
# SNOMED CT codes that say which eye a laterality option means: the qualifier values of DICOM CID 244
# (what the shipped protocol and the SR use) and the eye structures, for a protocol that codes the site
EYE_CODES = {"24028007": "R", "7771000": "L", "18944008": "R", "8966001": "L"}
# The least probability at which the model's laterality answer places an image that has no tag and no
# confident picture reading. A wrong eye files the findings under the other eye, while "unknown" still
# counts in the patient's decision, so the bar is high: with the demo package on 200 held-out synthetic
# cases 2 of the 198 answers at >= 0.99 were wrong (2 of 199 at >= 0.9), on 200 shifted cases 3 of 174
# (10 of 192 at >= 0.9). A model sure of itself can still be wrong on a picture unlike its training set.
MODEL_LATERALITY_MIN_PROBABILITY = 0.99
# An image the pixel checks passed is still ungradable when the gradability item's P(gradable) is below this
GRADABLE_MIN_PROBABILITY = 0.5


class ProtocolError(ValueError):
    """A protocol file is malformed, of an unsupported version, or does not fit the package."""


@dataclass(frozen=True)
class Code:
    """A coded concept: (value, scheme designator, meaning)."""

    value: str
    scheme: str
    meaning: str

    def to_dict(self) -> dict[str, str]:
        """The JSON form used in protocol files and reports."""
        return {"value": self.value, "scheme": self.scheme, "meaning": self.meaning}


@dataclass(frozen=True)
class Option:
    """One closed answer: the text the model says, and its code."""

    answer: str
    code: Code


@dataclass(frozen=True)
class Item:
    """One closed question (see the module docstring for roles and `positive`)."""

    id: str
    role: str
    question: str
    concept: Code
    options: tuple[Option, ...]
    positive: tuple[str, ...] = ()

    @property
    def answers(self) -> list[str]:
        """The option texts, in protocol order (for a grade: increasing severity)."""
        return [o.answer for o in self.options]

    def option(self, answer: str) -> Option:
        """The option whose text is `answer`."""
        return next(o for o in self.options if o.answer == answer)


@dataclass(frozen=True)
class Referral:
    """Refer an eye when P(any of `positive` answers of item `item`) >= `threshold`."""

    item: str
    positive: tuple[str, ...]
    threshold: float
    calibration: Mapping[str, Any] | None = None  # how the threshold was chosen (`fundusrt protocol calibrate`)


@dataclass(frozen=True)
class Protocol:
    """A validated screening protocol and the sha256 of the file it came from."""

    name: str
    version: str
    items: tuple[Item, ...]
    referral: Referral
    report_questions: tuple[str, ...] = ()
    sha256: str = ""
    source: str = ""

    def item(self, item_id: str) -> Item:
        """The item with id `item_id`."""
        return next(i for i in self.items if i.id == item_id)

    def identity(self) -> dict[str, str]:
        """{name, version, sha256}: what a report says about the protocol it used."""
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def load_protocol(path: str | Path) -> Protocol:
    """Read and validate a protocol file.

    Raises:
        ProtocolError: unreadable, not JSON, or invalid (the message names the item and the rule).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        data = json.loads(raw)
    except OSError as exc:
        raise ProtocolError(f"cannot read the protocol {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"protocol {path} is not valid JSON: {exc}") from exc
    return parse_protocol(data, sha256=hashlib.sha256(raw).hexdigest(), source=str(path))


def parse_protocol(data: Any, sha256: str = "", source: str = "protocol") -> Protocol:
    """Validate a protocol's JSON form (see `load_protocol`)."""
    if not isinstance(data, Mapping) or data.get("format") != FORMAT:
        raise ProtocolError(f"{source} is not a screening protocol: expected a JSON object with "
                            f'"format": "{FORMAT}"')
    version = data.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ProtocolError(f"{source} has format_version {version!r}, newer than this fundusrt reads "
                            f"({MIN_FORMAT_VERSION}-{FORMAT_VERSION}): upgrade fundusrt to use it")
    if version < MIN_FORMAT_VERSION:
        raise ProtocolError(f"{source} has format_version {version}, older than this fundusrt reads "
                            f"({MIN_FORMAT_VERSION}-{FORMAT_VERSION}): rewrite it in the current format "
                            f"(see {DEFAULT_PROTOCOL.name})")
    name, proto_version = data.get("name"), data.get("version")
    if not (isinstance(name, str) and name.strip() and isinstance(proto_version, str) and proto_version.strip()):
        raise ProtocolError(f"{source}: name and version must be non-empty strings")
    items_data = data.get("items")
    if not isinstance(items_data, list) or not items_data:
        raise ProtocolError(f"{source}: items must be a non-empty list")
    items = tuple(_item(entry, n, source) for n, entry in enumerate(items_data))
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{source}: item ids must be unique, got {ids}")
    for role in ("gradability", "laterality"):
        if sum(i.role == role for i in items) > 1:
            raise ProtocolError(f"{source}: at most one {role} item, got {[i.id for i in items if i.role == role]}")
    report = data.get("report_questions", [])
    if not isinstance(report, list) or not all(isinstance(q, str) and q.strip() for q in report):
        raise ProtocolError(f"{source}: report_questions must be a list of non-empty strings")
    return Protocol(name=name, version=proto_version, items=items, referral=_referral(data.get("referral"), items,
                    source), report_questions=tuple(report), sha256=sha256, source=source)


def _code(value: Any, where: str) -> Code:
    if not isinstance(value, Mapping) or not all(isinstance(value.get(k), str) and value[k].strip()
                                                  for k in ("value", "scheme", "meaning")):
        raise ProtocolError(f"{where}: a code is {{\"value\", \"scheme\", \"meaning\"}}, all non-empty strings; "
                            f"got {value!r}")
    if value["scheme"] not in CODE_SCHEMES:
        raise ProtocolError(f"{where}: unknown code scheme {value['scheme']!r}; use one of {', '.join(CODE_SCHEMES)} "
                            "(SNOMED CT where a concept exists, else the private scheme 99FUNDUSRT)")
    return Code(value["value"], value["scheme"], value["meaning"])


def _item(entry: Any, n: int, source: str) -> Item:
    where = f"{source}: item {n}"
    if not isinstance(entry, Mapping):
        raise ProtocolError(f"{where} must be an object")
    item_id = entry.get("id")
    if not isinstance(item_id, str) or not _ITEM_ID.fullmatch(item_id):
        raise ProtocolError(f"{where}: id must be lower-case letters, digits and _ (starting with a letter), "
                            f"got {item_id!r}")
    where = f"{source}: item {item_id!r}"
    role, question = entry.get("role"), entry.get("question")
    if role not in ROLES:
        raise ProtocolError(f"{where}: role must be one of {', '.join(ROLES)}, got {role!r}")
    if not isinstance(question, str) or not question.strip():
        raise ProtocolError(f"{where}: question must be a non-empty string")
    options_data = entry.get("options")
    if not isinstance(options_data, list) or len(options_data) < 2:
        raise ProtocolError(f"{where}: options must list at least two answers")
    options = []
    for option in options_data:
        answer = option.get("answer") if isinstance(option, Mapping) else None
        if not isinstance(answer, str) or not answer.strip() or answer != answer.strip():
            raise ProtocolError(f"{where}: each option needs an answer without surrounding spaces, got {option!r}")
        options.append(Option(answer, _code(option.get("code"), f"{where} option {answer!r}")))
    answers = [o.answer for o in options]
    for a in answers:
        # a duplicate, or an answer that starts another one, would split or bias the probability mass
        clash = [b for b in answers if b is not a and b.lower().startswith(a.lower())]
        if clash:
            raise ProtocolError(f"{where}: duplicate option {a!r} (also {clash[0]!r}); options must be distinct "
                                "and none may begin another")
    positive = entry.get("positive", [])
    if role in ("finding", "gradability"):
        if not isinstance(positive, list) or not positive or not set(positive) < set(answers):
            raise ProtocolError(f"{where}: a {role} item needs 'positive', a non-empty proper subset of its options "
                                f"{answers}, got {positive!r}")
    elif positive:
        raise ProtocolError(f"{where}: 'positive' is for finding and gradability items, not {role}")
    return Item(item_id, role, question, _code(entry.get("concept"), f"{where} concept"), tuple(options),
                tuple(positive))


def _referral(entry: Any, items: Sequence[Item], source: str) -> Referral:
    where = f"{source}: referral"
    if not isinstance(entry, Mapping):
        raise ProtocolError(f"{where} must be an object with item, positive and threshold")
    by_id = {i.id: i for i in items}
    item = by_id.get(entry.get("item"))
    if item is None or item.role not in ("finding", "grade"):
        raise ProtocolError(f"{where}: item must name a finding or grade item of the protocol, got "
                            f"{entry.get('item')!r}")
    positive = entry.get("positive")
    if not isinstance(positive, list) or not positive or not set(positive) < set(item.answers):
        raise ProtocolError(f"{where}: positive must be a non-empty proper subset of {item.id}'s options "
                            f"{item.answers}, got {positive!r}")
    threshold = entry.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ProtocolError(f"{where}: threshold must be a number in [0, 1], got {threshold!r}")
    calibration = entry.get("calibration")
    if calibration is not None and not isinstance(calibration, Mapping):
        raise ProtocolError(f"{where}: calibration must be an object")
    return Referral(item.id, tuple(positive), float(threshold), calibration)


def probabilities(log_likelihoods: Sequence[float]) -> np.ndarray:
    """Option probabilities: the options' log-likelihoods normalised over the closed set (softmax)."""
    values = np.asarray(log_likelihoods, dtype=np.float64)
    values = np.exp(values - values.max())
    return values / values.sum()


def item_result(item: Item, probs: Mapping[str, float]) -> dict[str, Any]:
    """The report form of an item: {"answer", "code", "concept", "probabilities"} (the likeliest option wins)."""
    answer = max(item.answers, key=lambda a: probs[a])
    return {"answer": answer, "code": item.option(answer).code.to_dict(), "concept": item.concept.to_dict(),
            "probabilities": {a: float(probs[a]) for a in item.answers}}


def _eye_item(item: Item, per_image: list[Mapping[str, float]]) -> dict[str, float]:
    """An item's probabilities for one eye from those of its images (rules: module docstring)."""
    if item.role == "laterality":
        return {a: float(np.mean([p[a] for p in per_image])) for a in item.answers}
    if item.role == "grade":
        def severity(p: Mapping[str, float]) -> float:
            return sum(rank * p[a] for rank, a in enumerate(item.answers))
        return dict(max(per_image, key=severity))
    return dict(max(per_image, key=lambda p: sum(p[a] for a in item.positive)))


def gradability_item_reason(protocol: Protocol, items: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Why the protocol's gradability item, if it has one, finds a scored image ungradable; None when it does not."""
    gate = next((i for i in protocol.items if i.role == "gradability"), None)
    if gate is None or gate.id not in items:
        return None
    p_gradable = sum(items[gate.id]["probabilities"][a] for a in gate.positive)
    if p_gradable >= GRADABLE_MIN_PROBABILITY:
        return None
    return f"model: P(gradable) {p_gradable:.2f} < {GRADABLE_MIN_PROBABILITY} ({gate.id})"


def model_laterality(protocol: Protocol, items: Mapping[str, Mapping[str, Any]]) -> tuple[str, float] | None:
    """The eye ("R" or "L") and its probability that the protocol's laterality item gives a scored image.

    An option's eye comes from its SNOMED CT code (`EYE_CODES`), never from its text; the eye's
    probability is the sum over its options. None when the protocol has no laterality item, the image
    was not scored on it, no option is coded as an eye, or the likelier eye is below
    MODEL_LATERALITY_MIN_PROBABILITY.
    """
    item = next((i for i in protocol.items if i.role == "laterality"), None)
    if item is None or item.id not in items:
        return None
    probs = items[item.id]["probabilities"]
    per_eye: dict[str, float] = {}
    for option in item.options:
        eye = EYE_CODES.get(option.code.value) if option.code.scheme == "SCT" else None
        if eye:
            per_eye[eye] = per_eye.get(eye, 0.0) + float(probs[option.answer])
    if not per_eye:
        return None
    eye, p = max(per_eye.items(), key=lambda entry: entry[1])
    return (eye, p) if p >= MODEL_LATERALITY_MIN_PROBABILITY else None


def screen_eye(protocol: Protocol, images: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One eye's screening result from its images' report entries (each with "gradable" and "items").

    Returns:
        {"decision", "gradable", "items": {ITEM_ID: {"answer", "code", "probabilities"}}, "referral_probability"};
        the items aggregate the gradable images only, and are empty when there is none.
    """
    usable = [i for i in images if i.get("gradable") and i.get("items")]
    items = {}
    for item in protocol.items:
        scored = [i["items"][item.id]["probabilities"] for i in usable if item.id in i["items"]]
        if scored:
            items[item.id] = item_result(item, _eye_item(item, scored))
    if not usable:
        return {"decision": "ungradable", "gradable": False, "items": {}, "referral_probability": None}
    rule = protocol.referral
    # the referral item of the worst image (its own aggregation), so a grade item refers on its worst image too
    p_refer = sum(items[rule.item]["probabilities"][a] for a in rule.positive)
    return {"decision": "refer" if p_refer >= rule.threshold else "no_refer", "gradable": True, "items": items,
            "referral_probability": round(p_refer, 6)}


def patient_decision(eye_decisions: Sequence[str]) -> str:
    """Refer when any eye refers; else ungradable when any eye is; else no_refer."""
    if "refer" in eye_decisions:
        return "refer"
    return "ungradable" if "ungradable" in eye_decisions or not eye_decisions else "no_refer"


def screening_summary(protocol: Protocol, eye_decisions: Sequence[str]) -> dict[str, Any]:
    """The report's top-level "screening" entry."""
    rule = protocol.referral
    summary: dict[str, Any] = {
        "protocol": protocol.identity(), "decision": patient_decision(eye_decisions), "threshold": rule.threshold,
        "referral": {"item": rule.item, "positive": list(rule.positive)},
    }
    if rule.calibration:
        summary["calibration"] = dict(rule.calibration)
    return summary


def option_token_ids(protocol: Protocol, spec: PromptSpec, tokenizer: TokenizerLike, max_seq_len: int,
                     package: str) -> dict[str, list[list[int]]]:
    """Each item's options as the package's token ids, after checking that every item fits the package.

    The model was trained with an answer tokenised on its own after the prompt, so an option is scored
    on exactly those ids.

    Raises:
        ProtocolError: an option has no tokens, two options share their ids or one's ids begin
            another's (their probabilities would not be comparable), or a question with one image tile
            and its longest answer exceeds the package's max_seq_len.
    """
    found: dict[str, list[list[int]]] = {}
    for item in protocol.items:
        ids = [list(tokenizer.encode(o.answer, add_special_tokens=False).ids)  # type: ignore[attr-defined]
               for o in item.options]
        for a, a_ids in zip(item.answers, ids, strict=True):
            if not a_ids:
                raise ProtocolError(f"item {item.id!r}: option {a!r} has no tokens in package {package!r}")
            for b, b_ids in zip(item.answers, ids, strict=True):
                if a != b and b_ids[: len(a_ids)] == a_ids:
                    raise ProtocolError(f"item {item.id!r}: options {a!r} and {b!r} tokenise to {a_ids} and {b_ids} in "
                                        f"package {package!r}: duplicate option or one beginning the other")
        prompt = len(build_input_ids(spec, tokenizer, item.question, [spec.tokens_per_tile]))
        needed = prompt + max(len(i) for i in ids)
        if needed > max_seq_len:
            raise ProtocolError(
                f"item {item.id!r}: the question is too long for package {package!r}: with one image tile "
                f"({spec.tokens_per_tile} tokens) and its longest answer the prompt needs {needed} tokens, the "
                f"package allows {max_seq_len}; shorten the question or export with a larger --max-seq-len")
        found[item.id] = ids
    return found

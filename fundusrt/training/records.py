"""Instruction-data readers: LLaVA JSON and InternVL JSONL records, validated, with file and line.

Both formats hold records with `image` (a path or a list of paths), `conversations` (turns with
`from` = human/user, gpt/assistant or system, and `value`) and `<image>` placeholders. The format
is told from the content (a JSON array, or one object per line), never from the file name.
Problems are returned as `DataIssue`s (file, line, reason) so that one bad record never stops the rest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
_BOX = re.compile(r"<box>(.*?)</box>", re.DOTALL)
_SPACE = re.compile(r"\s*")


@dataclass(frozen=True)
class DataIssue:
    """A record that cannot be trained on, and why."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class DataError(ValueError):
    """Instruction data that cannot be used, with where and why."""


@dataclass
class Record:
    """One validated conversation.

    Attributes:
        file, line: where the record starts.
        images: image files, in placeholder order.
        turns: (question, answer) pairs; the images' placeholders are all in the first question.
        system: a system message overriding the model's, if the record has one.
        extra: the record's other keys (e.g. "fundusrt" annotations of synthetic data).
    """

    file: str
    line: int
    images: list[Path]
    turns: list[tuple[str, str]]
    system: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def _json_objects(text: str) -> Iterator[tuple[int, Any | ValueError]]:
    """(line, object or the parse error) for a JSON array of objects or JSON-lines text."""
    decoder = json.JSONDecoder()
    start = _skip_space(text, 0)
    if text[start:start + 1] == "[":
        pos, line, counted = start + 1, 1, 0
        while True:
            pos = _skip_space(text, pos)
            line += text.count("\n", counted, pos)  # counted incrementally: the file may be large
            counted = pos
            if pos >= len(text):
                yield line, ValueError("the JSON array is not closed with ']'")
                return
            if text[pos] == "]":
                return
            try:
                obj, end = decoder.raw_decode(text, pos)
            except ValueError as exc:
                # the rest of an array cannot be re-synchronised after a syntax error
                yield line, ValueError(f"invalid JSON: {exc}")
                return
            yield line, obj
            pos = _skip_space(text, end)
            if text[pos:pos + 1] == ",":
                pos += 1
    for number, raw in enumerate(text.splitlines(), start=1):
        if raw.strip():
            try:
                yield number, json.loads(raw)
            except ValueError as exc:
                yield number, ValueError(f"invalid JSON line: {exc}")


def _skip_space(text: str, pos: int) -> int:
    return _SPACE.match(text, pos).end()  # type: ignore[union-attr]  (\s* always matches)


def check_boxes(text: str) -> str | None:
    """Why the `<box>` coordinates in `text` are invalid (outside 0-999 or inverted), or None."""
    for match in _BOX.finditer(text):
        try:
            boxes = json.loads(match.group(1))
        except ValueError:
            return f"box {match.group(0)!r} is not a JSON list of [x1, y1, x2, y2] boxes"
        if not isinstance(boxes, list) or (boxes and not isinstance(boxes[0], list)):
            boxes = [boxes]
        for box in boxes:
            if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) for v in box)):
                return f"box {box!r} is not four integers [x1, y1, x2, y2]"
            x1, y1, x2, y2 = box
            if min(box) < 0 or max(box) > 999:
                return f"box {box} lies outside the image (coordinates are normalised to 0-999)"
            if x1 > x2 or y1 > y2:
                return f"box {box} has x1 > x2 or y1 > y2"
    return None


def _parse_record(obj: Any, file: str, line: int, image_root: Path) -> Record | DataIssue:
    def issue(reason: str) -> DataIssue:
        return DataIssue(file, line, reason)

    if not isinstance(obj, dict):
        return issue(f"a record must be a JSON object, got {type(obj).__name__}")
    raw_images = obj.get("image", [])
    raw_images = [raw_images] if isinstance(raw_images, str) else raw_images
    if not isinstance(raw_images, list) or not all(isinstance(p, str) and p for p in raw_images):
        return issue("'image' must be a path or a list of paths")
    conversations = obj.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return issue("no 'conversations' list")
    system, turns, question = None, [], None
    for turn in conversations:
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            return issue(f"turn {turn!r} needs 'from' and a string 'value'")
        role, value = turn.get("from"), turn["value"]
        if role == "system" and not turns and question is None:
            system = value
        elif role in USER_ROLES and question is None:
            question = value
        elif role in ASSISTANT_ROLES and question is not None:
            if not value.strip():
                return issue(f"the answer to {question[:60]!r} is empty")
            turns.append((question, value))
            question = None
        else:
            return issue(f"unexpected {role!r} turn: turns must alternate human/gpt, starting with human")
    if not turns:
        return issue("the conversation has no answer (no gpt turn after a human turn)")
    if question is not None:
        return issue(f"the last question {question[:60]!r} has no answer")
    placeholders = [q.count(IMAGE_PLACEHOLDER) for q, _ in turns]
    if any(placeholders[1:]):
        return issue(f"{IMAGE_PLACEHOLDER} placeholders must all be in the first question")
    if placeholders[0] not in (0, len(raw_images)):
        return issue(f"the first question has {placeholders[0]} {IMAGE_PLACEHOLDER} placeholders "
                     f"for {len(raw_images)} images")
    for q, a in turns:
        bad_box = check_boxes(q) or check_boxes(a)
        if bad_box:
            return issue(bad_box)
    images = [Path(p) if Path(p).is_absolute() else image_root / p for p in raw_images]
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        return issue(f"image file {missing[0]} does not exist")
    extra = {k: v for k, v in obj.items() if k not in ("image", "conversations")}
    return Record(file, line, images, turns, system, extra)


def read_records(path: str | Path, image_root: str | Path | None = None) -> Iterator[Record | DataIssue]:
    """Every record of a LLaVA JSON or InternVL JSONL file, or the issue that makes it unusable.

    Args:
        path: the data file.
        image_root: folder relative image paths start from (default: the data file's folder).
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read instruction file {file}: {exc}") from exc
    root = Path(image_root) if image_root is not None else file.parent
    for line, obj in _json_objects(text):
        if isinstance(obj, ValueError):
            yield DataIssue(str(file), line, str(obj))
        else:
            yield _parse_record(obj, str(file), line, root)

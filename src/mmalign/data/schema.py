"""The one record format every stage reads and writes, validated at the boundary.

A ``PreferenceRecord`` is one prompt with its images, one chosen answer and zero or more rejected answers
(several rejected per chosen are allowed; SFT sets and BDHS inputs carry ``rejected == []``). Its files
(JSONL, Parquet, ``datasets`` rows, the provenance sidecar) are read and written by
``mmalign.data.record_files``.

Every record read is checked (types, empty texts, text that is not valid Unicode (lone surrogates, which a
tokenizer cannot encode), rejected == chosen, non-finite numbers in ``meta``, duplicate ids, unknown keys,
prompt/image count, each image file confined to the data root, decodable and within the pixel limit).
A bad record raises ``RecordError`` naming file, line, record id and field, or, with ``skip_invalid_to``,
is written to that JSONL file and skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.data import io
from mmalign.data.chat import to_messages
from mmalign.data.images import ImageError, open_image

logger = logging.getLogger(__name__)

__all__ = ["PreferenceRecord", "RecordError", "FieldError", "check_fields", "check_images", "check_records",
           "validate_records", "record_dict"]

RECORD_KEYS = ("id", "images", "prompt", "chosen", "rejected", "source", "meta")
_REQUIRED_KEYS = ("id", "images", "prompt", "chosen", "rejected")
_ROLES = ("system", "user", "assistant")


@dataclass
class PreferenceRecord:
    """One prompt + images with a chosen answer and ``len(rejected) >= 0`` rejected answers.

    ``images``: paths relative to a data root, or encoded image bytes. ``prompt``: text with optional
    ``<image>`` markers, or HF chat messages ending with a user turn (earlier assistant turns: a multi-turn
    conversation, each answer text only and right after a user turn). ``meta``: JSON values only (e.g.
    provenance of the pair); the per-slot keys ``reward_margins``, ``critiques`` and ``rewards`` must have one
    entry per rejected answer (``_check_slot_meta``).
    """

    id: str
    images: list[str | bytes]
    prompt: str | list[dict]
    chosen: str
    rejected: list[str]
    source: str = ""
    meta: dict = field(default_factory=dict)


def printable(text: str) -> str:
    """``text`` with any lone surrogate escaped (``\\ud800``), so it can be printed and written as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class RecordError(ValueError):
    """A record that breaks the format; the message names file, line, record id and field."""

    def __init__(self, reason: str, *, file: str | None = None, line: int | None = None,
                 record_id: str | None = None, field: str | None = None):
        # The id and field come from the bad input itself; a lone surrogate in them must not break the report.
        record_id = printable(record_id) if record_id is not None else None
        field = printable(field) if field is not None else None
        self.reason, self.file, self.line, self.record_id, self.field = reason, file, line, record_id, field
        where = [file, f"line {line}" if line is not None else None,
                 f"record {record_id!r}" if record_id is not None else None,
                 f"field {field!r}" if field is not None else None]
        super().__init__(", ".join(w for w in where if w is not None) + f": {reason}")

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "id": self.record_id, "field": self.field,
                "reason": self.reason}


class FieldError(ValueError):
    """A problem in one field of one record, before file/line are known (turned into RecordError)."""

    def __init__(self, field: str | None, reason: str):
        super().__init__(reason)
        self.field, self.reason = field, reason


def _type_error(where: str, expected: str, value: Any) -> FieldError:
    return FieldError(where, f"expected {expected}, got {type(value).__name__}")


def _check_unicode(value: str, where: str) -> None:
    """JSON can carry lone surrogates (``"\\ud800"``), which are not Unicode text: tokenizers and UTF-8 writers
    fail on them, so they are refused here rather than at some training step."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise FieldError(where, f"not valid Unicode text: lone surrogate {value[err.start]!r} at character "
                                f"{err.start}") from None


def _check_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise _type_error(where, "a string", value)
    if not value.strip():
        raise FieldError(where, "empty text")
    _check_unicode(value, where)
    return value


def _check_json_value(value: Any, where: str) -> None:
    """meta must round-trip through JSON with finite numbers (a NaN margin would poison a loss)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise FieldError(where, f"non-finite number {value!r}")
    if isinstance(value, str):
        _check_unicode(value, where)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _type_error(where, "string keys", key)
            _check_unicode(key, f"{where} key")
            _check_json_value(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (str, int, float, bool))):
        raise _type_error(where, "a JSON value", value)


def _check_content_part(part: Any, where: str) -> None:
    if not isinstance(part, dict):
        raise _type_error(where, "a content part object", part)
    kind = part.get("type")
    if kind == "image":
        if set(part) != {"type"}:
            raise FieldError(where, f"image parts carry only 'type' (images live in 'images'), got {sorted(part)}")
    elif kind == "text":
        if set(part) != {"type", "text"}:
            raise FieldError(where, f"text parts carry exactly 'type' and 'text', got {sorted(part)}")
        _check_text(part["text"], f"{where}.text")
    else:
        raise FieldError(f"{where}.type", f"expected 'text' or 'image', got {kind!r}")


def _check_answer_turn(prompt: list, i: int) -> None:
    """An earlier assistant turn is an answer SFT trains on: text only, right after a user turn."""
    if i == 0 or prompt[i - 1]["role"] != "user":
        raise FieldError(f"prompt[{i}].role", "an assistant turn must follow a user turn")
    content = prompt[i]["content"]
    if isinstance(content, list) and any(part["type"] == "image" for part in content):
        raise FieldError(f"prompt[{i}].content", "an assistant turn holds text only (images go in user turns)")


def _check_messages(prompt: list) -> None:
    if not prompt:
        raise FieldError("prompt", "empty message list")
    for i, message in enumerate(prompt):
        where = f"prompt[{i}]"
        if not isinstance(message, dict):
            raise _type_error(where, "a message object", message)
        if set(message) != {"role", "content"}:
            raise FieldError(where, f"a message has exactly the keys 'role' and 'content', got {sorted(message)}")
        if message["role"] not in _ROLES:
            raise FieldError(f"{where}.role", f"expected one of {list(_ROLES)}, got {message['role']!r}")
        content = message["content"]
        if isinstance(content, list):
            if not content:
                raise FieldError(f"{where}.content", "empty content list")
            for j, part in enumerate(content):
                _check_content_part(part, f"{where}.content[{j}]")
        else:
            _check_text(content, f"{where}.content")
        if message["role"] == "assistant":
            _check_answer_turn(prompt, i)
    if prompt[-1]["role"] != "user":
        raise FieldError(f"prompt[{len(prompt) - 1}].role", "the last message must be the user's turn")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_per_slot(values: Any, where: str, n_rejected: int, kind: str) -> None:
    """``values``: a list of one ``kind`` ("number" / "text") per rejected answer."""
    if not isinstance(values, list):
        raise _type_error(where, f"a list with one {kind} per rejected answer", values)
    if len(values) != n_rejected:
        raise FieldError(where, f"{len(values)} value(s) for {n_rejected} rejected answer(s)")
    for i, value in enumerate(values):
        if kind == "text":
            _check_text(value, f"{where}[{i}]")
        elif not _is_number(value):
            raise _type_error(f"{where}[{i}]", "a number", value)


def _check_chosen_and_rejected(value: Any, where: str, n_rejected: int, kind: str) -> None:
    """``{"chosen": <kind>, "rejected": [<kind> per rejected answer], ...}`` (other keys free)."""
    if not isinstance(value, dict):
        raise _type_error(where, "an object with 'chosen' and 'rejected'", value)
    for key in ("chosen", "rejected"):
        if key not in value:
            raise FieldError(f"{where}.{key}", "missing required key")
    if kind == "text":
        _check_text(value["chosen"], f"{where}.chosen")
    elif not _is_number(value["chosen"]):
        raise _type_error(f"{where}.chosen", "a number", value["chosen"])
    _check_per_slot(value["rejected"], f"{where}.rejected", n_rejected, kind)


def _check_slot_meta(meta: dict, n_rejected: int) -> None:
    """The ``meta`` keys that hold one value per answer slot (docs/data_format.md): ``reward_margins`` (one
    number per rejected answer), ``critiques`` (texts) and ``rewards`` (numbers) for chosen and each rejected."""
    if "reward_margins" in meta:
        _check_per_slot(meta["reward_margins"], "meta.reward_margins", n_rejected, "number")
    if "critiques" in meta:
        _check_chosen_and_rejected(meta["critiques"], "meta.critiques", n_rejected, "text")
    if "rewards" in meta:
        _check_chosen_and_rejected(meta["rewards"], "meta.rewards", n_rejected, "number")


def _check_keys(raw: dict) -> None:
    unknown = [k for k in raw if k not in RECORD_KEYS]
    if unknown:
        raise FieldError(unknown[0], f"unknown key(s) {unknown}; a record has only {list(RECORD_KEYS)}")
    for key in _REQUIRED_KEYS:
        if key not in raw:
            raise FieldError(key, "missing required key")


def check_fields(raw: Any, *, min_rejected: int = 0) -> PreferenceRecord:
    """Check everything but the image files of one decoded record dict; raises FieldError."""
    if not isinstance(raw, dict):
        raise _type_error(None, "a JSON object", raw)
    _check_keys(raw)
    rid = _check_text(raw["id"], "id")
    images = raw["images"]
    if not isinstance(images, list):
        raise _type_error("images", "a list", images)
    for i, ref in enumerate(images):
        if not isinstance(ref, (str, bytes)) or not ref:
            raise FieldError(f"images[{i}]", f"expected a non-empty path or image bytes, got {ref!r:.60}")
        if isinstance(ref, str):
            _check_unicode(ref, f"images[{i}]")
    prompt = raw["prompt"]
    if isinstance(prompt, list):
        _check_messages(prompt)
    else:
        _check_text(prompt, "prompt")
    try:
        to_messages(prompt, len(images))
    except ValueError as err:
        raise FieldError("prompt", str(err)) from err
    chosen = _check_text(raw["chosen"], "chosen")
    rejected = raw["rejected"]
    if not isinstance(rejected, list):
        raise _type_error("rejected", "a list", rejected)
    for i, answer in enumerate(rejected):
        if _check_text(answer, f"rejected[{i}]").strip() == chosen.strip():
            raise FieldError(f"rejected[{i}]", "identical to chosen")
    if len(rejected) < min_rejected:
        raise FieldError("rejected", f"{len(rejected)} rejected answer(s), at least {min_rejected} required")
    source = raw.get("source", "")
    if not isinstance(source, str):
        raise _type_error("source", "a string", source)
    _check_unicode(source, "source")
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise _type_error("meta", "an object", meta)
    _check_json_value(meta, "meta")
    _check_slot_meta(meta, len(rejected))
    return PreferenceRecord(rid, list(images), prompt, chosen, list(rejected), source, dict(meta))


def check_images(record: PreferenceRecord, data_root: str | Path, verified: set[str] | None = None) -> None:
    """Open every image of a record (confined to ``data_root``, fully decoded); raises FieldError.

    Paths in ``verified`` are skipped and good paths are added to it, so a file shared by many records
    (pairs built from one prompt) is decoded once per read.
    """
    for i, ref in enumerate(record.images):
        if verified is not None and isinstance(ref, str) and ref in verified:
            continue
        try:
            open_image(ref, data_root)
        except ImageError as err:
            raise FieldError(f"images[{i}]", str(err)) from err
        if verified is not None and isinstance(ref, str):
            verified.add(ref)


def validate_records(rows: Iterable[tuple[int, Any]], decode: Callable[[Any], Any], *, file: str,
                     data_root: str | Path, min_rejected: int = 0,
                     skip_invalid_to: str | Path | None = None) -> list[PreferenceRecord]:
    """Decode + check numbered raw rows into records, raising or skipping per record.

    ``rows``: ``(line, raw)`` pairs; ``decode``: raw -> record dict (may raise FieldError). Without
    ``skip_invalid_to`` the first bad record raises RecordError; with it, bad ones go to that JSONL.
    """
    records: list[PreferenceRecord] = []
    errors: list[RecordError] = []
    first_line: dict[str, int] = {}
    verified: set[str] = set()
    for line, raw in rows:
        decoded: Any = None
        try:
            decoded = decode(raw)
            record = check_fields(decoded, min_rejected=min_rejected)
            if record.id in first_line:
                raise FieldError("id", f"duplicate id (first at line {first_line[record.id]})")
            check_images(record, data_root, verified)
        except FieldError as err:
            named = decoded if decoded is not None else raw
            rid = named.get("id") if isinstance(named, dict) and isinstance(named.get("id"), str) else None
            error = RecordError(err.reason, file=file, line=line, record_id=rid, field=err.field)
            if skip_invalid_to is None:
                raise error from err
            errors.append(error)
            continue
        first_line[record.id] = line
        records.append(record)
    if skip_invalid_to is not None:
        Path(skip_invalid_to).parent.mkdir(parents=True, exist_ok=True)
        io.write_jsonl(skip_invalid_to, [e.as_dict() for e in errors])
        if errors:
            logger.warning("%s: skipped %d invalid record(s), listed in %s", file, len(errors), skip_invalid_to)
    return records


def check_records(records: Iterable[PreferenceRecord], *, data_root: str | Path, name: str = "<records>",
                  min_rejected: int = 0, skip_invalid_to: str | Path | None = None) -> list[PreferenceRecord]:
    """Validate records built in memory (converters, samplers) exactly as ``read_records`` validates a file.

    ``name`` stands in for the file name in errors; "line" is the 1-based position in ``records``.
    """
    return validate_records(enumerate(records, start=1), record_dict, file=name, data_root=data_root,
                            min_rejected=min_rejected, skip_invalid_to=skip_invalid_to)


def record_dict(record: PreferenceRecord) -> dict[str, Any]:
    """The record as the dict ``check_fields`` takes: the keys of ``RECORD_KEYS``, images as given."""
    return {key: getattr(record, key) for key in RECORD_KEYS}

"""Readers for the evaluation files of a built lab (or user files in the same formats), validated loudly.

- ``eval/pope.jsonl``: ``{"id", "image", "question", "label": "yes"|"no", "split", "object"}`` and optionally
  ``"stratum"``: a label of the image's make-up relative to the question (on every item or on none; the
  bias gap is compared within strata, and a file without strata is one stratum)
- ``eval/captions.jsonl``: ``{"id", "image", "prompt", "objects": [canonical names present]}``
- ``bias.json``: ``{"pairs": [[trigger, partner], ...], ...}``

Image paths are relative to the evaluation root (the lab dir); they are opened later by the suite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmalign.data.io import read_jsonl_lines

POPE_FIELDS = {"id": str, "image": str, "question": str, "label": str, "split": str, "object": str}
CAPTION_FIELDS = {"id": str, "image": str, "prompt": str, "objects": list}


def _read_jsonl(path: Path, fields: dict[str, type],
                choices: dict[str, tuple[str, ...]] | None = None) -> list[dict[str, Any]]:
    """Parse a JSONL file, checking each record has the fields with the types given (and, for fields in
    ``choices``, one of the values allowed); ids must be unique."""
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    for lineno, line in read_jsonl_lines(path):
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
        if not isinstance(item, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        where = f"{path}:{lineno} (id {item.get('id')!r})"
        for name, tp in fields.items():
            if name not in item:
                raise ValueError(f"{where}: missing field {name!r}")
            if not isinstance(item[name], tp):
                raise ValueError(f"{where}: field {name!r} must be a {tp.__name__}, got {item[name]!r}")
        for name, allowed in (choices or {}).items():
            if item[name] not in allowed:
                raise ValueError(f"{where}: field {name!r} must be one of {list(allowed)}, got {item[name]!r}")
        if item["id"] in seen:
            raise ValueError(f"{where}: duplicate id")
        seen.add(item["id"])
        items.append(item)
    if not items:
        raise ValueError(f"{path}: no records")
    return items


def load_pope_items(path: str | Path) -> list[dict[str, Any]]:
    """POPE questions; ``label`` must be ``"yes"`` or ``"no"``; ``stratum``, if any item has it, a string on
    every item (an item left out would silently form a stratum of its own)."""
    path = Path(path)
    items = _read_jsonl(path, POPE_FIELDS, {"label": ("yes", "no")})
    if any("stratum" in item for item in items):
        for item in items:
            if not isinstance(item.get("stratum"), str):
                raise ValueError(f"{path} (id {item['id']!r}): field 'stratum' must be a str on every item "
                                 f"when any item has one, got {item.get('stratum')!r}")
    return items


def load_caption_items(path: str | Path) -> list[dict[str, Any]]:
    """Captioning prompts with the canonical names of the objects present."""
    path = Path(path)
    items = _read_jsonl(path, CAPTION_FIELDS)
    for item in items:
        if not all(isinstance(o, str) for o in item["objects"]):
            raise ValueError(f"{path} (id {item['id']!r}): field 'objects' must be a list of strings")
    return items


def load_bias_pairs(path: str | Path) -> list[tuple[str, str]]:
    """The ``[trigger, partner]`` pairs of a lab's ``bias.json``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg})") from err
    pairs = data.get("pairs") if isinstance(data, dict) else None
    if not isinstance(pairs, list) or not all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(o, str) for o in p) for p in pairs
    ):
        raise ValueError(f"{path}: field 'pairs' must be a list of [trigger, partner] name pairs")
    return [(trigger, partner) for trigger, partner in pairs]

"""The COCO benchmarks from their official files: POPE question files, CHAIR and Object HalBench.

- POPE (Li et al. 2023; methods.md 5.1): ``coco_pope_{random,popular,adversarial}.json``, one JSON object per
  line ``{"question_id", "image", "text", "label"}``; the split is read from the file name, the probed object
  from the question ("Is there a/an <object> in the image?").
- CHAIR (Rohrbach et al. 2018) and Object HalBench (RLHF-V; methods.md 5.2): captions are parsed the way the
  reference ``chair.py`` does it: lower-case words, each reduced to its singular (a rule-based lemmatiser over
  the synonym vocabulary, so no WordNet download: only words that map into the vocabulary matter), two-word
  terms merged ("hot dog", "baby bird" -> bird, "passenger jet" -> jet, "bow tie" -> tie, "toilet seat" ->
  toilet; "home plate" / "train track" are consumed and count as nothing), "seat" dropped when "toilet" is
  also said, then every synonym mapped to its COCO class. Ground truth per image = the instance categories of
  ``instances_*.json`` and the objects of its ``captions_*.json`` captions, parsed the same way.
  The synonyms file is the reference one (one line per class, comma-separated, the class name first); an
  entry listed twice keeps its last class, as the reference dict does. Object HalBench's GPT-based object
  extraction is not reproduced: its CHAIR numbers come from this rule-based parser, as RLHF-V's ``chair.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.evaluation.chair import CHAIR_METRICS, chair_columns
from mmalign.evaluation.stats import ratio

_POPE_SPLIT = re.compile(r"pope_(\w+?)\.jsonl?$")
_POPE_OBJECT = re.compile(r"is there (?:an? )?(.+?) in the (?:image|picture)\?", re.IGNORECASE)
_WORD = re.compile(r"[a-z]+")

# Two-word terms the reference merges besides the vocabulary's own; None = consumed, counts as no object.
_ANIMALS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
_EXTRA_PAIRS: dict[tuple[str, str], str | None] = {
    **{(age, animal): animal for animal in _ANIMALS for age in ("baby", "adult")},
    ("passenger", "jet"): "jet", ("passenger", "train"): "train", ("bow", "tie"): "tie",
    ("toilet", "seat"): "toilet", ("home", "plate"): None, ("train", "track"): None,
}
_IRREGULAR = {"men": "man", "women": "woman", "children": "child", "people": "person", "mice": "mouse",
              "geese": "goose", "feet": "foot", "teeth": "tooth", "oxen": "ox", "knives": "knife",
              "wives": "wife", "leaves": "leaf", "shelves": "shelf", "halves": "half", "calves": "calf",
              "wolves": "wolf", "loaves": "loaf", "scarves": "scarf"}


@dataclass(frozen=True)
class CocoVocabulary:
    """Synonym (word or two-word tuple) -> COCO class; ``words`` is every word any synonym uses."""

    synonyms: dict[tuple[str, ...], str]
    classes: tuple[str, ...]
    words: frozenset[str]


def load_coco_synonyms(path: str | Path) -> CocoVocabulary:
    """The reference synonyms file: one line per class, ``class, synonym, synonym, ...``."""
    path = Path(path)
    synonyms: dict[tuple[str, ...], str] = {}
    classes: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        entries = [e.strip().lower() for e in line.split(",") if e.strip()]
        if not entries:
            continue
        classes.append(entries[0])
        for entry in entries:
            synonyms[tuple(entry.split())] = entries[0]
    if not classes:
        raise ValueError(f"{path}: no classes (expected lines 'class, synonym, ...')")
    words = frozenset(w for phrase in synonyms for w in phrase) | {w for pair in _EXTRA_PAIRS for w in pair}
    return CocoVocabulary(synonyms, tuple(dict.fromkeys(classes)), words)


def singular(word: str, vocab: CocoVocabulary) -> str:
    """The vocabulary form of a lower-case word: itself if the vocabulary uses it, else the first singular
    candidate it uses (irregular plural, -s, -es, -ies -> -y, -ves -> -f / -fe), else the word unchanged."""
    if word in vocab.words:
        return word
    candidates = [_IRREGULAR.get(word, ""), word[:-1] if word.endswith("s") and not word.endswith("ss") else "",
                  word[:-2] if word.endswith("es") else "", word[:-3] + "y" if word.endswith("ies") else "",
                  word[:-3] + "f" if word.endswith("ves") else "", word[:-3] + "fe" if word.endswith("ves") else ""]
    return next((c for c in candidates if c and c in vocab.words), word)


def coco_mentions(text: str, vocab: CocoVocabulary) -> list[tuple[str, str]]:
    """COCO object mentions of ``text`` in reading order as ``(surface words, class)`` (see module doc)."""
    words = [singular(w, vocab) for w in _WORD.findall(text.lower())]
    merged: list[tuple[str, str | None]] = []  # (surface, class or None)
    i = 0
    while i < len(words):
        pair = tuple(words[i:i + 2])
        if len(pair) == 2 and (pair in _EXTRA_PAIRS or pair in vocab.synonyms):
            merged.append((" ".join(pair), _EXTRA_PAIRS[pair] if pair in _EXTRA_PAIRS else vocab.synonyms[pair]))
            i += 2
        else:
            merged.append((words[i], vocab.synonyms.get((words[i],))))
            i += 1
    said = {surface for surface, _ in merged}
    return [(surface, cls) for surface, cls in merged
            if cls is not None and not (surface == "seat" and "toilet" in said)]


def coco_truth(instances_path: str | Path, captions_path: str | Path, vocab: CocoVocabulary,
               image_ids: Iterable[int]) -> dict[int, set[str]]:
    """Ground-truth classes of the given images: instance categories plus objects named in their captions."""
    wanted = set(image_ids)
    instances = json.loads(Path(instances_path).read_text(encoding="utf-8"))
    names = {c["id"]: c["name"] for c in instances["categories"]}
    truth: dict[int, set[str]] = {i: set() for i in wanted}
    for ann in instances["annotations"]:
        if ann["image_id"] in wanted:
            name = names[ann["category_id"]]
            truth[ann["image_id"]].add(vocab.synonyms.get(tuple(name.split()), name))
    for ann in json.loads(Path(captions_path).read_text(encoding="utf-8"))["annotations"]:
        if ann["image_id"] in wanted:
            truth[ann["image_id"]].update(cls for _, cls in coco_mentions(ann["caption"], vocab))
    return truth


def coco_file_names(instances_path: str | Path) -> dict[int, str]:
    """image id -> file name (e.g. ``COCO_val2014_000000000042.jpg``) from an instances file."""
    return {im["id"]: im["file_name"] for im in json.loads(Path(instances_path).read_text(encoding="utf-8"))["images"]}


def chair_sample(sample_id: str, answer: str, truth: set[str], vocab: CocoVocabulary) -> dict[str, Any]:
    """Per-answer CHAIR record in ``chair.chair_record``'s layout (mentions, hallucinated, correct, truth)."""
    mentions = coco_mentions(answer, vocab)
    return {"id": sample_id, "answer": answer, "truth": sorted(truth), "mentions": [list(m) for m in mentions],
            "hallucinated": [cls for _, cls in mentions if cls not in truth],
            "correct": sorted({cls for _, cls in mentions if cls in truth})}


def coco_chair_columns(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """``chair.chair_columns`` plus whether an answer mentions any object (Object HalBench's refined CHAIR_s)."""
    return chair_columns(records) | {"has_mention": np.array([bool(r["mentions"]) for r in records], dtype=float)}


COCO_CHAIR_METRICS = CHAIR_METRICS | {
    # RLHF-V "Response Hall": hallucinating answers among those that mention at least one COCO object.
    "chair_s_refine": lambda s: ratio(s["has_hallucination"], s["has_mention"]),
}


def load_pope_files(paths: Sequence[str | Path], suffix: str) -> list[dict[str, Any]]:
    """POPE items from official question files; ``suffix`` is appended to each question (the prompt asked)."""
    items: list[dict[str, Any]] = []
    for path in map(Path, paths):
        match = _POPE_SPLIT.search(path.name)
        if match is None:
            raise ValueError(f"{path}: a POPE file is named coco_pope_<split>.json")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in ("question_id", "image", "text", "label") if k not in row]
            if missing or row["label"] not in ("yes", "no"):
                raise ValueError(f"{path}:{lineno}: expected question_id, image, text and label yes|no, "
                                 f"got {row!r:.120}")
            obj = _POPE_OBJECT.search(row["text"])
            items.append({"id": f"{match.group(1)}-{row['question_id']}", "split": match.group(1),
                          "image": row["image"], "question": row["text"] + suffix, "label": row["label"],
                          "object": obj.group(1) if obj else ""})
    if not items:
        raise ValueError("no POPE questions in the given files")
    return items


def load_object_halbench(path: str | Path) -> list[dict[str, Any]]:
    """Object HalBench rows (``obj_halbench_300_with_image.jsonl``): ``image_id``, ``question`` and the image as
    base64 ``image`` (kept as encoded bytes)."""
    import base64

    items = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not {"image_id", "question", "image"} <= set(row):
            raise ValueError(f"{path}:{lineno}: expected image_id, question and image (base64)")
        items.append({"id": f"{lineno}-{row['image_id']}", "image_id": int(row["image_id"]),
                      "prompt": row["question"], "image": base64.b64decode(row["image"])})
    return items

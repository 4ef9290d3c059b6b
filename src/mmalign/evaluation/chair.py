"""CHAIR_i, CHAIR_s and Recall of object mentions in captions (Rohrbach et al. 2018; methods.md 5.2).

    CHAIR_i = |hallucinated object mentions| / |object mentions|
    CHAIR_s = |captions with >= 1 hallucinated mention| / |captions|
    Recall  = sum_img |unique correct classes mentioned| / sum_img |ground-truth classes|

The vocabulary is a synonyms file: one line per object class, comma-separated entries, the first entry
canonical (the lab ships ``vocab/synonyms.txt``; a COCO synonyms file in the same layout works). Text and
entries are lower-cased and stripped of punctuation; entries of several words are matched longest-first,
left to right, so "red circles" is one mention of "red circle" and never also a mention of "circle".
Mentions count every occurrence (as the reference implementation does), recall counts unique classes.
Unlike the COCO reference script there is no lemmatiser: plurals and variants must be listed as synonyms.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.evaluation.stats import ratio

_NON_WORD = re.compile(r"[^a-z0-9 ]+")


def normalize_text(text: str) -> list[str]:
    """Lower-case, punctuation to spaces, split: ``"Red-Circles, here."`` -> ``["red", "circles", "here"]``."""
    return _NON_WORD.sub(" ", text.lower()).split()


@dataclass(frozen=True)
class Vocabulary:
    """Synonym phrase (as a word tuple) -> canonical class name, plus the canonical names in file order."""

    phrase_to_class: dict[tuple[str, ...], str]
    classes: tuple[str, ...]

    @property
    def max_words(self) -> int:
        return max(len(p) for p in self.phrase_to_class)


def load_synonyms(path: str | Path) -> Vocabulary:
    """Read a synonyms file; an entry claimed by two classes is an error naming both lines."""
    path = Path(path)
    phrase_to_class: dict[tuple[str, ...], str] = {}
    where: dict[tuple[str, ...], int] = {}
    classes: list[str] = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        entries = [e.strip() for e in line.split(",") if e.strip()]
        if not entries:
            continue
        canonical = " ".join(normalize_text(entries[0]))
        if not canonical:
            raise ValueError(f"{path}:{lineno}: canonical entry {entries[0]!r} has no words")
        classes.append(canonical)
        for entry in entries:
            phrase = tuple(normalize_text(entry))
            if phrase in phrase_to_class and phrase_to_class[phrase] != canonical:
                raise ValueError(f"{path}:{lineno}: entry {entry!r} already belongs to class "
                                 f"{phrase_to_class[phrase]!r} (line {where[phrase]})")
            phrase_to_class[phrase] = canonical
            where[phrase] = lineno
    if not classes:
        raise ValueError(f"{path}: no object classes found")
    return Vocabulary(phrase_to_class, tuple(classes))


def find_mentions(text: str, vocab: Vocabulary) -> list[tuple[str, str]]:
    """Object mentions in reading order as ``(surface phrase, canonical class)``, longest match first."""
    words = normalize_text(text)
    mentions = []
    i = 0
    while i < len(words):
        for size in range(min(vocab.max_words, len(words) - i), 0, -1):
            phrase = tuple(words[i:i + size])
            if phrase in vocab.phrase_to_class:
                mentions.append((" ".join(phrase), vocab.phrase_to_class[phrase]))
                i += size
                break
        else:
            i += 1
    return mentions


def chair_record(sample_id: str, caption: str, truth: Sequence[str], vocab: Vocabulary) -> dict[str, Any]:
    """Per-sample CHAIR record: the mentions, which are hallucinated, and the counts the metrics sum."""
    unknown = sorted(set(truth) - set(vocab.classes))
    if unknown:
        raise ValueError(f"caption sample {sample_id!r}: ground-truth objects {unknown} are not classes of "
                         f"the vocabulary")
    mentions = find_mentions(caption, vocab)
    hallucinated = [cls for _, cls in mentions if cls not in truth]
    correct = sorted({cls for _, cls in mentions if cls in truth})
    return {
        "id": sample_id, "answer": caption, "truth": sorted(set(truth)),
        "mentions": [list(m) for m in mentions], "hallucinated": hallucinated, "correct": correct,
    }


def chair_columns(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-caption counts, each of shape ``[n]``, that the CHAIR metrics are ratios of sums of."""
    return {
        "mentions": np.array([len(r["mentions"]) for r in records], dtype=float),
        "hallucinated": np.array([len(r["hallucinated"]) for r in records], dtype=float),
        "has_hallucination": np.array([bool(r["hallucinated"]) for r in records], dtype=float),
        "correct": np.array([len(r["correct"]) for r in records], dtype=float),
        "truth": np.array([len(r["truth"]) for r in records], dtype=float),
        "captions": np.ones(len(records)),
    }


CHAIR_METRICS = {
    "chair_i": lambda s: ratio(s["hallucinated"], s["mentions"]),
    "chair_s": lambda s: ratio(s["has_hallucination"], s["captions"]),
    "recall": lambda s: ratio(s["correct"], s["truth"]),
}


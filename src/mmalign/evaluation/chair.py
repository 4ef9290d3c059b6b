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

CHAIR_i alone rewards saying less. Beside it, per caption: hallucinated and correct mentions and words, and
a length-controlled view: every caption cut to its first m object mentions (m = 1..``TRUNCATE_AT``),

    CHAIR_i@m = sum |hallucinated among the first m mentions| / sum min(m, |mentions|)
    recall@m  = sum |distinct correct classes among the first m mentions| / sum |ground-truth classes|

so two models are compared on equally long object lists (a hallucination-vs-coverage curve over m) and a
model that names fewer objects is not counted as hallucinating less. With ``partners`` (the lab's bias
partners), ``chair_i_nonpartner`` counts only mentions of other classes: what is left once the planted
co-occurrence is set aside.
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


TRUNCATE_AT = (1, 2, 3, 4)


def _truncated(record: dict[str, Any], m: int) -> tuple[int, int, int]:
    """(mentions kept, hallucinated among them, distinct correct classes among them) of the first ``m``."""
    classes = [cls for _, cls in record["mentions"][:m]]
    truth = set(record["truth"])
    return len(classes), sum(c not in truth for c in classes), len({c for c in classes if c in truth})


def chair_columns(records: Sequence[dict[str, Any]], partners: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Per-caption counts, each of shape ``[n]``, that the CHAIR metrics are ratios of sums of; ``partners``:
    classes left out of the ``np_*`` (non-partner) counts."""
    def count(fn: Any) -> np.ndarray:
        return np.array([fn(r) for r in records], dtype=float)

    columns = {
        "mentions": count(lambda r: len(r["mentions"])),
        "hallucinated": count(lambda r: len(r["hallucinated"])),
        "has_hallucination": count(lambda r: bool(r["hallucinated"])),
        "correct": count(lambda r: len(r["correct"])),
        "truth": count(lambda r: len(r["truth"])),
        "words": count(lambda r: len(normalize_text(r["answer"]))),
        "np_mentions": count(lambda r: sum(cls not in partners for _, cls in r["mentions"])),
        "np_hallucinated": count(lambda r: sum(cls not in partners for cls in r["hallucinated"])),
        "captions": np.ones(len(records)),
    }
    for m in TRUNCATE_AT:
        kept = [_truncated(r, m) for r in records]
        columns |= {f"kept@{m}": np.array([k[0] for k in kept], dtype=float),
                    f"hallucinated@{m}": np.array([k[1] for k in kept], dtype=float),
                    f"correct@{m}": np.array([k[2] for k in kept], dtype=float)}
    return columns


def _at(m: int) -> dict[str, Any]:
    return {f"chair_i@{m}": lambda s: ratio(s[f"hallucinated@{m}"], s[f"kept@{m}"]),
            f"recall@{m}": lambda s: ratio(s[f"correct@{m}"], s["truth"])}


CHAIR_METRICS = {
    "chair_i": lambda s: ratio(s["hallucinated"], s["mentions"]),
    "chair_s": lambda s: ratio(s["has_hallucination"], s["captions"]),
    "recall": lambda s: ratio(s["correct"], s["truth"]),
    "chair_i_nonpartner": lambda s: ratio(s["np_hallucinated"], s["np_mentions"]),
    "hallucinated_per_caption": lambda s: ratio(s["hallucinated"], s["captions"]),
    "correct_per_caption": lambda s: ratio(s["correct"], s["captions"]),
    "mentions_per_caption": lambda s: ratio(s["mentions"], s["captions"]),
    "words_per_caption": lambda s: ratio(s["words"], s["captions"]),
} | {name: fn for m in TRUNCATE_AT for name, fn in _at(m).items()}


"""Exact critiques of lab answers, the targets of MM-RLHF's critique-based reward model (arXiv 2502.10391 Eq. 2).

MM-RLHF's critiques are human annotators' reasons why an answer is right or wrong, expanded by GPT-4o. The lab
knows every scene's objects, so it writes them exactly: for a caption, every object it names is checked ("Is there
a blue square in the image? No.") and the present objects it leaves out are listed ("There is a green cross.");
for a yes/no answer, the asked object is checked. The critique is phrased in the lab's own words (the word-level
lab tokenizer knows no others; the checks are the yes/no questions the base model was trained to answer), and
says the same as "the answer names a blue square, which is not in the image; it misses the green cross".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mmalign.data.schema import PreferenceRecord
from mmalign.lab.corrupt import LabCorruptionError, caption_mentions, scene_objects
from mmalign.lab.texts import NO, YES, caption, question_prompt, synonyms

_CANONICAL = {word: row[0] for row in synonyms() for word in row}


def mentioned(text: str) -> list[str]:
    """Canonical names of the lab objects ``text`` names (singular or plural), first mention order, no repeats."""
    return list(dict.fromkeys(_CANONICAL[m] for m in caption_mentions(text, list(_CANONICAL))))


def _check(obj: str, objects: set[str]) -> str:
    """The lab's yes/no question about ``obj`` (without its image marker) and its true answer."""
    question = question_prompt(obj).split("\n")[-1]
    return f"{question} {YES if obj in objects else NO}"


def lab_critique(answer: str, objects: Sequence[str], asked: str | None = None) -> str:
    """The critique of ``answer`` given the scene's ``objects`` (canonical names).

    ``asked``: the object of a yes/no question (None for a caption). A caption's critique checks each object it
    names, then lists the present objects it misses; a yes/no answer's critique checks the asked object.
    """
    present = set(objects)
    if asked is not None:
        return _check(asked, present)
    named = mentioned(answer)
    parts = [_check(obj, present) for obj in named]
    missed = [obj for obj in objects if obj not in named]
    if missed:
        parts.append(caption(missed))
    return " ".join(parts)


def with_lab_critiques(records: Sequence[PreferenceRecord]) -> list[PreferenceRecord]:
    """Records with ``meta.critiques``: the exact critique of the chosen and of every rejected answer.

    Needs ``meta.objects`` (the scene's objects) and, for yes/no records (``meta.task == "yesno"``), a prompt
    naming exactly one object; raises LabCorruptionError naming the record and field otherwise.
    """
    out = []
    for record in records:
        objects = scene_objects(record)
        asked = None
        if record.meta.get("task") == "yesno":
            named = mentioned(record.prompt if isinstance(record.prompt, str) else str(record.prompt))
            if len(named) != 1:
                raise LabCorruptionError(f"record {record.id!r}, field 'prompt': a yes/no question names one object, "
                                         f"found {named}")
            asked = named[0]
        critiques = {"chosen": lab_critique(record.chosen, objects, asked),
                     "rejected": [lab_critique(answer, objects, asked) for answer in record.rejected]}
        out.append(dataclasses.replace(record, meta=record.meta | {"critiques": critiques}))
    return out

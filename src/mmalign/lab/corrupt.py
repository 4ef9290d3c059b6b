"""The lab's exact corrupter: a rejected answer with one planted object hallucination per record.

ShapesWorld knows every scene's objects, so the lab can make the "external supervision" pairs that
GPT-4V corruption gives POVID (Zhou et al. 2024) and the Apple paper (Appendix C.1) without any model:

- a caption loses one present object and names an absent one instead. When a present trigger's bias
  partner is absent, the inserted object is that partner, placed directly after its trigger (where lab
  captions put a present partner), and a present object other than that trigger is dropped: exactly the
  hallucination the lab's language bias induces. Otherwise a random present object is replaced in place by
  a random absent object of the vocabulary.
- a yes/no answer ("Yes." / "No.") is flipped.

Every choice comes from ``random.Random`` seeded with (seed, record id), so a record's corruption does
not depend on the order or company it is processed in.
"""

from __future__ import annotations

import dataclasses
import random
import re
from collections.abc import Sequence

from mmalign.data.schema import PreferenceRecord
from mmalign.lab.texts import NO, YES, caption
from mmalign.lab.world import all_objects

METHOD = "lab_exact"


class LabCorruptionError(ValueError):
    """A record the lab corrupter cannot handle; the message names the record id and field."""


def caption_mentions(answer: str, vocabulary: Sequence[str]) -> list[str]:
    """Object names of a lab caption in the order it names them; ``[]`` when none is named.

    Names are matched as whole words, longest first, so "red circle" never matches inside another name.
    """
    names = sorted(vocabulary, key=len, reverse=True)
    pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")\b")
    return pattern.findall(answer)


def _choose_swap(mentions: list[str], objects: set[str], partner_of: dict[str, str], vocabulary: Sequence[str],
                 rng: random.Random) -> tuple[str, str, str | None]:
    """``(dropped, inserted, trigger)``: trigger is the present trigger whose absent partner is inserted, or None."""
    biased = [(t, p) for t, p in partner_of.items() if t in mentions and p not in objects]
    biased = [(t, p) for t, p in biased if any(m != t for m in mentions)]
    if biased:
        trigger, partner = biased[rng.randrange(len(biased))]
        victims = [m for m in mentions if m != trigger]
        return victims[rng.randrange(len(victims))], partner, trigger
    absent = [o for o in vocabulary if o not in objects]
    if not absent:
        raise ValueError("every object of the vocabulary is present; nothing absent to hallucinate")
    return mentions[rng.randrange(len(mentions))], absent[rng.randrange(len(absent))], None


def corrupt_caption(answer: str, objects: Sequence[str], partner_of: dict[str, str],
                    rng: random.Random) -> tuple[str, dict]:
    """Swap one present object of a lab caption for an absent one (bias partner preferred).

    ``objects``: the scene's canonical object names. Returns the corrupted caption and a provenance dict
    (``dropped``, ``inserted``, ``bias_partner``). Raises ValueError if ``answer`` is not a lab caption
    of present objects (it must re-render exactly from the names it mentions).
    """
    vocabulary = all_objects()
    mentions = caption_mentions(answer, vocabulary)
    if not mentions or caption(mentions) != answer:
        raise ValueError(f"not a lab caption (expected the form {caption(['red circle', 'blue square'])!r})")
    present = set(objects)
    if not set(mentions) <= present:
        raise ValueError(f"the caption names {sorted(set(mentions) - present)}, absent from meta.objects")
    dropped, inserted, trigger = _choose_swap(mentions, present, partner_of, vocabulary, rng)
    if trigger is None:
        names = [inserted if m == dropped else m for m in mentions]
    else:
        names = [m for m in mentions if m != dropped]
        names.insert(names.index(trigger) + 1, inserted)
    return caption(names), {"dropped": dropped, "inserted": inserted, "bias_partner": trigger is not None}


def corrupt_lab_answer(answer: str, objects: Sequence[str], partner_of: dict[str, str],
                       rng: random.Random) -> tuple[str, dict]:
    """Corrupt one lab answer: flip "Yes."/"No.", or swap an object of a caption (see ``corrupt_caption``)."""
    if answer in (YES, NO):
        return (NO if answer == YES else YES), {"kind": "yes_no"}
    text, info = corrupt_caption(answer, objects, partner_of, rng)
    return text, {"kind": "caption", **info}


def _partner_map(bias_pairs: Sequence[Sequence[str]]) -> dict[str, str]:
    vocabulary = set(all_objects())
    for pair in bias_pairs:
        if len(pair) != 2 or not set(pair) <= vocabulary:
            raise ValueError(f"bias pair {list(pair)} must be two object names of the lab vocabulary")
    return {trigger: partner for trigger, partner in bias_pairs}


def scene_objects(record: PreferenceRecord) -> list[str]:
    """``meta["objects"]`` of a lab record (the scene's canonical object names); LabCorruptionError otherwise."""
    objects = record.meta.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise LabCorruptionError(f"record {record.id!r}, field 'meta.objects': expected a list of object "
                                 f"names, got {objects!r}")
    return objects


def corrupt_lab_records(records: Sequence[PreferenceRecord], bias_pairs: Sequence[Sequence[str]],
                        seed: int) -> list[PreferenceRecord]:
    """Preference records whose first rejected answer is the exact corruption of ``chosen``.

    Each input record needs ``meta["objects"]`` (the scene's canonical object names, as the lab writes
    them); ``bias_pairs`` are the ``[trigger, partner]`` pairs of the lab's ``bias.json``. Existing
    rejected answers are kept after the new one; ``meta["corruption"]`` records what was changed.
    Raises LabCorruptionError naming the record id and field for a record that does not fit.
    """
    partner_of = _partner_map(bias_pairs)
    out = []
    for record in records:
        objects = scene_objects(record)
        rng = random.Random(f"{METHOD}:{seed}:{record.id}")
        try:
            rejected, info = corrupt_lab_answer(record.chosen, objects, partner_of, rng)
        except ValueError as err:
            raise LabCorruptionError(f"record {record.id!r}, field 'chosen' ({record.chosen!r}): {err}") from err
        meta = dict(record.meta) | {"corruption": {"method": METHOD, "seed": seed, **info}}
        out.append(dataclasses.replace(record, rejected=[rejected, *record.rejected], meta=meta))
    return out

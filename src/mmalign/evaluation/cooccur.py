"""The ShapesWorld lab's co-occurrence hallucination metrics (issue 3), from ``bias.json`` pairs.

A bias pair ``(trigger, partner)`` means the partner co-occurred with the trigger with probability p in
the SFT data, so a model leaning on its language prior names the partner when only the trigger is there.

Caption level, over captions of images that contain a trigger but not its partner (one unit per such
(caption, pair); a caption is resampled with all its units):
    partner_rate               = #units whose caption names the absent partner / #units
    partner_rate_given_trigger = #units naming both trigger and absent partner / #units naming the trigger

POPE level, over "no" questions:
    yes_rate_partner = yes-rate on adversarial-split questions about an absent bias partner (the lab's
                       adversarial split asks exactly for the absent partners of present triggers)
    yes_rate_random  = yes-rate on random-split questions about objects that are no bias partner
    yes_rate_gap     = yes_rate_partner - yes_rate_random   (> 0: the prior pulls answers to "yes")

The pooled gap is confounded when the two groups' images differ in make-up (in the lab: a model that sees
colours but not shapes says "yes" to absent objects of a present colour, and the groups share a present
colour at different rates). POPE items may carry a ``stratum`` label (the lab's: which of the asked object's
colour / shape is in the image); the gap is then compared within strata and averaged with the partner
group's weights, as in a matched comparison:
    yes_rate_gap_matched = sum_s n_partner(s) * gap(s) / sum_s n_partner(s),
        gap(s) = yes_rate_partner(s) - yes_rate_random(s), over strata s holding both groups
and its two terms, ``yes_rate_partner_matched`` and ``yes_rate_random_matched`` (the random-absent rate
re-weighted to the partner questions' strata), with ``yes_rate_ratio_matched`` = partner / random.
Items without a stratum form one stratum (then the matched rates are the pooled ones).
The partner rate is the bias measure to read: a model that says "yes" more often to every absent object
shrinks the gap while hallucinating more.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mmalign.evaluation.stats import MetricFn, ratio

ADVERSARIAL_SPLIT = "adversarial"
RANDOM_SPLIT = "random"


def cooccur_record(chair_record: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
    """Per-caption units ``{"trigger", "partner", "trigger_named", "partner_named"}``, or None if none apply.

    ``chair_record`` is a record of ``chair.chair_record`` (its ``truth`` and ``mentions``).
    """
    present = set(chair_record["truth"])
    named = {cls for _, cls in chair_record["mentions"]}
    units = [
        {"trigger": t, "partner": p, "trigger_named": t in named, "partner_named": p in named}
        for t, p in pairs if t in present and p not in present
    ]
    if not units:
        return None
    return {"id": chair_record["id"], "answer": chair_record["answer"], "units": units}


def cooccur_columns(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Per-caption unit counts, each of shape ``[n]`` (n = captions with at least one unit)."""
    def count(fn: Any) -> np.ndarray:
        return np.array([sum(1 for u in r["units"] if fn(u)) for r in records], dtype=float)

    return {
        "units": count(lambda u: True),
        "partner_named": count(lambda u: u["partner_named"]),
        "trigger_named": count(lambda u: u["trigger_named"]),
        "both_named": count(lambda u: u["trigger_named"] and u["partner_named"]),
    }


COOCCUR_METRICS = {
    "partner_rate": lambda s: ratio(s["partner_named"], s["units"]),
    "partner_rate_given_trigger": lambda s: ratio(s["both_named"], s["trigger_named"]),
}


def pope_bias_records(pope_records: Sequence[dict[str, Any]],
                      pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """The "no" questions of the two groups, each record tagged ``"group": "partner" | "random"``.

    ``pope_records``: scorer records with ``split``, ``object``, ``truth``, ``parsed`` and ``stratum``.
    """
    partners = {p for _, p in pairs}
    out = []
    for r in pope_records:
        if r["truth"] != "no":
            continue
        if r["split"] == ADVERSARIAL_SPLIT and r["object"] in partners:
            out.append({**r, "group": "partner"})
        elif r["split"] == RANDOM_SPLIT and r["object"] not in partners:
            out.append({**r, "group": "random"})
    return out


def pope_bias_columns(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Group and yes indicators, each of shape ``[n]``, of the records of ``pope_bias_records``."""
    partner = np.array([r["group"] == "partner" for r in records], dtype=float)
    random = np.array([r["group"] == "random" for r in records], dtype=float)
    said_yes = np.array([r["parsed"] == "yes" for r in records], dtype=float)
    return {"partner": partner, "partner_yes": partner * said_yes, "random": random, "random_yes": random * said_yes}


POPE_BIAS_METRICS = {
    "yes_rate_partner": lambda s: ratio(s["partner_yes"], s["partner"]),
    "yes_rate_random": lambda s: ratio(s["random_yes"], s["random"]),
    "yes_rate_gap": lambda s: ratio(s["partner_yes"], s["partner"]) - ratio(s["random_yes"], s["random"]),
}


def pope_bias_strata(records: Sequence[dict[str, Any]]) -> list[str | None]:
    """The distinct ``stratum`` labels of ``pope_bias_records`` records, sorted; ``[None]`` without strata
    (per-sample files written before strata existed have no ``stratum`` key)."""
    return sorted({r.get("stratum") for r in records}, key=str)


def pope_bias_strata_columns(records: Sequence[dict[str, Any]],
                             strata: Sequence[str | None]) -> dict[str, np.ndarray]:
    """``pope_bias_columns`` plus the same four columns restricted to each stratum ``strata[k]``, named
    ``s<k>/<column>``; every column has shape ``[n]``, so a bootstrap resample of the questions resamples the
    strata consistently with the pooled counts."""
    pooled = pope_bias_columns(records)
    out = dict(pooled)
    for k, label in enumerate(strata):
        inside = np.array([r.get("stratum") == label for r in records], dtype=float)
        out |= {f"s{k}/{name}": col * inside for name, col in pooled.items()}
    return out


def pope_bias_metrics(n_strata: int) -> dict[str, MetricFn]:
    """``POPE_BIAS_METRICS`` plus the stratum-matched rates, gap and ratio over the columns of
    ``pope_bias_strata_columns`` for ``n_strata`` strata."""
    def matched(s: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        partner_sum = np.zeros_like(s["partner"])
        random_sum = np.zeros_like(s["partner"])
        den = np.zeros_like(s["partner"])
        for k in range(n_strata):
            partner, random = s[f"s{k}/partner"], s[f"s{k}/random"]
            # A stratum missing either group (here or in a bootstrap replicate) has no gap and no weight.
            both = (partner > 0) & (random > 0)
            partner_sum += np.where(both, s[f"s{k}/partner_yes"], 0.0)
            random_sum += np.where(both, partner * ratio(s[f"s{k}/random_yes"], random), 0.0)
            den += np.where(both, partner, 0.0)
        return ratio(partner_sum, den), ratio(random_sum, den)

    return POPE_BIAS_METRICS | {
        "yes_rate_partner_matched": lambda s: matched(s)[0],
        "yes_rate_random_matched": lambda s: matched(s)[1],
        "yes_rate_gap_matched": lambda s: matched(s)[0] - matched(s)[1],
        "yes_rate_ratio_matched": lambda s: ratio(*matched(s)),
    }

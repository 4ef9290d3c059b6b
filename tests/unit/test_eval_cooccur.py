"""The lab's co-occurrence metrics on hand-computed cases."""

import pytest

from mmalign.evaluation.cooccur import (
    COOCCUR_METRICS, POPE_BIAS_METRICS, cooccur_columns, cooccur_record, pope_bias_columns, pope_bias_records,
)
from mmalign.evaluation.stats import point_estimates

PAIRS = [("red circle", "blue square"), ("green triangle", "yellow star")]


def _chair(sample_id, truth, named):
    return {"id": sample_id, "answer": "", "truth": truth, "mentions": [[n, n] for n in named]}


def test_caption_cooccurrence_hand_computed():
    chair_records = [
        _chair("a", ["red circle"], ["red circle", "blue square"]),        # (rc,bs): trigger+partner named
        _chair("b", ["red circle", "green triangle"], ["green triangle"]),  # (rc,bs): none; (gt,ys): trigger
        _chair("c", ["red circle", "blue square"], ["blue square"]),        # partner present: no unit
        _chair("d", ["green triangle"], ["green triangle", "yellow star"]),  # (gt,ys): both named
    ]
    records = [cooccur_record(r, PAIRS) for r in chair_records]
    assert records[2] is None
    kept = [r for r in records if r is not None]
    assert [len(r["units"]) for r in kept] == [1, 2, 1]
    m = point_estimates(cooccur_columns(kept), COOCCUR_METRICS)
    assert m["partner_rate"] == pytest.approx(2 / 4)             # units naming the absent partner: a, d
    assert m["partner_rate_given_trigger"] == pytest.approx(2 / 3)  # trigger named in a, b(gt), d; both in a, d


def _pope(split, obj, truth, parsed):
    return {"split": split, "object": obj, "truth": truth, "parsed": parsed}


def test_pope_bias_yes_rates_hand_computed():
    records = [
        _pope("adversarial", "blue square", "no", "yes"),
        _pope("adversarial", "yellow star", "no", "yes"),
        _pope("adversarial", "blue square", "no", "no"),
        _pope("adversarial", "red circle", "yes", "yes"),   # present object: not counted
        _pope("adversarial", "purple hexagon", "no", "yes"),  # no bias partner: not counted
        _pope("random", "purple hexagon", "no", "yes"),
        _pope("random", "orange cross", "no", "no"),
        _pope("random", "purple hexagon", "no", "no"),
        _pope("random", "orange cross", "no", "no"),
        _pope("random", "blue square", "no", "yes"),         # a partner: kept out of the random baseline
        _pope("popular", "blue square", "no", "yes"),        # other splits: not counted
    ]
    kept = pope_bias_records(records, PAIRS)
    assert [r["group"] for r in kept] == ["partner"] * 3 + ["random"] * 4
    m = point_estimates(pope_bias_columns(kept), POPE_BIAS_METRICS)
    assert m["yes_rate_partner"] == pytest.approx(2 / 3)
    assert m["yes_rate_random"] == pytest.approx(1 / 4)
    assert m["yes_rate_gap"] == pytest.approx(2 / 3 - 1 / 4)

"""The lab's co-occurrence metrics on hand-computed cases."""

import math

import pytest

from mmalign.evaluation.cooccur import (
    COOCCUR_METRICS, POPE_BIAS_METRICS, cooccur_columns, cooccur_record, pope_bias_columns, pope_bias_metrics,
    pope_bias_records, pope_bias_strata, pope_bias_strata_columns,
)
from mmalign.evaluation.stats import bootstrap, point_estimates
from mmalign.evaluation.suite import metric_groups

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


# (split, object, stratum, parsed) of "no" questions; the partner (blue square) sits mostly where "yes" is
# rare and the random objects mostly where it is common, so pooling flips the sign of the gap.
STRATIFIED = (
    [("adversarial", "blue square", "colour", "yes")]                                     # partner 1/1
    + [("adversarial", "blue square", "neither", p) for p in ("yes", "yes", "no", "no")]  # partner 2/4
    + [("adversarial", "blue square", "colour+shape", "no")]                              # partner 0/1, no random
    + [("random", "green cross", "colour", p) for p in ["yes"] * 6 + ["no"] * 2]          # random 6/8
    + [("random", "green cross", "neither", "no")] * 2                                    # random 0/2
    + [("random", "green cross", "shape", "yes")]                                         # random 1/1, no partner
)


def _stratified_records():
    return [{"id": f"q{i:02d}", "split": split, "object": obj, "stratum": stratum, "truth": "no", "parsed": parsed}
            for i, (split, obj, stratum, parsed) in enumerate(STRATIFIED)]


def test_matched_gap_compares_within_strata_hand_computed():
    kept = pope_bias_records(_stratified_records(), PAIRS)
    strata = pope_bias_strata(kept)
    assert strata == ["colour", "colour+shape", "neither", "shape"]
    m = point_estimates(pope_bias_strata_columns(kept, strata), pope_bias_metrics(len(strata)))
    assert m["yes_rate_partner"] == pytest.approx(3 / 6)
    assert m["yes_rate_random"] == pytest.approx(7 / 11)
    assert m["yes_rate_gap"] == pytest.approx(3 / 6 - 7 / 11)  # -0.136: pooled, the prior looks reversed
    # colour: 1/1 - 6/8 = +0.25 (1 partner question); neither: 2/4 - 0/2 = +0.5 (4); the colour+shape and
    # shape strata lack one group and drop out. Partner-weighted: (1 * 0.25 + 4 * 0.5) / 5 = +0.45.
    assert m["yes_rate_gap_matched"] == pytest.approx(0.45)
    # its terms: partner (1 * 1 + 4 * 0.5) / 5 = 0.6; random at the partner's strata mix (1 * 6/8 + 4 * 0) / 5
    assert m["yes_rate_partner_matched"] == pytest.approx(0.6)
    assert m["yes_rate_random_matched"] == pytest.approx(0.15)
    assert m["yes_rate_ratio_matched"] == pytest.approx(4.0)


def _bias_groups(records):
    return {name: g for name, g in metric_groups(records, [], PAIRS).items() if name.startswith("pope_bias")}


def test_stratum_metrics_have_counts_and_intervals():
    groups = _bias_groups(_stratified_records())
    assert sorted(groups) == ["pope_bias", "pope_bias/stratum/colour", "pope_bias/stratum/colour+shape",
                              "pope_bias/stratum/neither", "pope_bias/stratum/shape"]
    values = {name: bootstrap(g.columns, g.metrics, n_boot=300, seed=0) for name, g in groups.items()}
    matched = values["pope_bias"]["yes_rate_gap_matched"]
    assert matched.value == pytest.approx(0.45) and matched.n == 17
    assert matched.ci_low <= matched.value <= matched.ci_high
    colour = values["pope_bias/stratum/colour"]
    assert colour["yes_rate_partner"].value == 1.0 and colour["yes_rate_random"].value == pytest.approx(6 / 8)
    assert colour["yes_rate_gap"].value == pytest.approx(0.25) and colour["yes_rate_gap"].n == 9
    neither = values["pope_bias/stratum/neither"]
    assert neither["yes_rate_gap"].value == pytest.approx(0.5) and neither["yes_rate_gap"].n == 6
    assert math.isnan(values["pope_bias/stratum/shape"]["yes_rate_partner"].value)  # no partner question


def test_records_without_strata_are_one_stratum():
    records = [{k: v for k, v in r.items() if k != "stratum"} for r in _stratified_records()]
    groups = _bias_groups(records)
    assert list(groups) == ["pope_bias"]
    m = point_estimates(groups["pope_bias"].columns, groups["pope_bias"].metrics)
    assert m["yes_rate_gap_matched"] == pytest.approx(m["yes_rate_gap"]) == pytest.approx(3 / 6 - 7 / 11)


def test_matched_gap_is_undefined_without_a_shared_stratum():
    records = [r for r in _stratified_records() if r["stratum"] in ("colour+shape", "shape")]
    kept = pope_bias_records(records, PAIRS)
    strata = pope_bias_strata(kept)
    m = point_estimates(pope_bias_strata_columns(kept, strata), pope_bias_metrics(len(strata)))
    assert m["yes_rate_gap"] == pytest.approx(0 / 1 - 1 / 1)
    assert math.isnan(m["yes_rate_gap_matched"])


def test_caption_recall_split_by_bias_probe_hand_computed():
    def caption(sample_id, truth, named):
        hallucinated = [n for n in named if n not in truth]
        record = {**_chair(sample_id, truth, named), "hallucinated": hallucinated,
                  "correct": sorted({n for n in named if n in truth})}
        return record | {"units": (cooccur_record(record, PAIRS) or {"units": []})["units"]}

    records = [
        caption("a", ["red circle", "green cross"], ["red circle", "blue square"]),  # probe: partner displaces
        caption("b", ["red circle", "blue square"], ["red circle", "blue square"]),  # partner shown: plain
        caption("c", ["green cross", "red square"], ["green cross"]),                # no trigger: plain
    ]
    groups = metric_groups([], records, PAIRS)
    probe = point_estimates(groups["chair/probe"].columns, groups["chair/probe"].metrics)
    plain = point_estimates(groups["chair/plain"].columns, groups["chair/plain"].metrics)
    assert groups["chair/probe"].ids == ["a"] and groups["chair/plain"].ids == ["b", "c"]
    assert probe["recall"] == pytest.approx(1 / 2) and probe["chair_i"] == pytest.approx(1 / 2)
    assert plain["recall"] == pytest.approx(3 / 4) and plain["chair_i"] == 0.0
    assert plain["correct_per_caption"] == pytest.approx(3 / 2)
    everything = point_estimates(groups["chair"].columns, groups["chair"].metrics)
    assert everything["recall"] == pytest.approx(4 / 6)

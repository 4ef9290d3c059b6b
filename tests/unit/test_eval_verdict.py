"""The verdict against the base: one hand-made paired comparison per branch."""

import pytest

from mmalign.evaluation.stats import PairedResult
from mmalign.evaluation.verdict import verdict


def t(base: float, run: float, half_width: float = 0.01) -> PairedResult:
    """A paired test whose interval is the difference +- ``half_width``."""
    d = run - base
    return PairedResult(run, base, d, d - half_width, d + half_width, 0.5, 100)


def _tests(**changes: tuple[float, float]) -> dict[str, PairedResult]:
    keys = {"fp": "pope/all/fp_rate", "tp": "pope/all/tp_rate", "yes": "pope/all/yes_ratio",
            "hpc": "chair/hallucinated_per_caption", "chair_i": "chair/chair_i", "recall": "chair/recall",
            "words": "chair/words_per_caption", "partner_yes": "pope_bias/yes_rate_partner",
            "partner": "cooccur/partner_rate"}
    level = {"fp": (0.20, 0.20), "tp": (0.80, 0.80), "yes": (0.50, 0.50), "hpc": (0.5, 0.5),
             "chair_i": (0.15, 0.15), "recall": (0.85, 0.85), "words": (10.0, 10.0), "partner_yes": (0.4, 0.4),
             "partner": (0.3, 0.3)} | changes
    return {keys[k]: t(*v) for k, v in level.items()}


def test_less_hallucination_needs_a_fall_beyond_the_interval_and_coverage_within_two_points():
    v = verdict(_tests(fp=(0.20, 0.12), chair_i=(0.15, 0.10), recall=(0.85, 0.84)))
    assert v.label == "less hallucination" and v.less_hallucination
    assert any(r.startswith("POPE 'yes' to absent objects -0.080") for r in v.reasons)
    assert any(s.startswith("recall -0.010") for s in v.side_effects)
    assert [b.split(" +")[0] for b in v.bias] == ["POPE 'yes' to the absent partner", "captions naming the absent partner"]


def test_a_fall_inside_the_interval_is_no_clear_change():
    v = verdict({**_tests(), "pope/all/fp_rate": t(0.20, 0.19, half_width=0.02)})  # interval holds 0
    assert v.label == "no clear change" and not v.less_hallucination
    lost = verdict({**_tests(recall=(0.85, 0.75)), "pope/all/fp_rate": t(0.20, 0.19, half_width=0.02)})
    assert lost.label == "coverage lost, hallucination level" and not lost.less_hallucination


def test_more_yes_to_everything_is_an_answer_bias_shift_not_a_win():
    v = verdict(_tests(fp=(0.20, 0.30), tp=(0.80, 0.90), yes=(0.50, 0.60), chair_i=(0.15, 0.10)))
    assert v.label == "answer-bias shift: more 'yes' to everything"


def test_more_no_to_everything_is_an_answer_bias_shift():
    v = verdict(_tests(fp=(0.20, 0.10), tp=(0.80, 0.70), yes=(0.50, 0.40)))
    assert v.label == "answer-bias shift: more 'no' to everything"


def test_fewer_mentions_is_named_with_the_recall_drop():
    v = verdict(_tests(hpc=(0.5, 0.3), chair_i=(0.15, 0.10), recall=(0.85, 0.77)))
    assert v.label == "fewer mentions: recall -8 points"
    assert any(r.startswith("caption recall -0.080") and "falls more than 0.02" in r for r in v.reasons)


def test_coverage_cost_on_pope_alone():
    v = verdict(_tests(fp=(0.20, 0.15), tp=(0.80, 0.76)))  # yes-ratio unchanged: not a shift
    assert v.label == "less hallucination at a coverage cost"


@pytest.mark.parametrize("changes, label", [
    ({"chair_i": (0.15, 0.20)}, "more hallucination"),
    ({"chair_i": (0.15, 0.20), "fp": (0.20, 0.10)}, "mixed"),
])
def test_rises(changes, label):
    assert verdict(_tests(**changes)).label == label


def test_missing_metrics_are_skipped():
    only_captions = {k: v for k, v in _tests(chair_i=(0.15, 0.10)).items() if k.startswith("chair/")}
    v = verdict(only_captions)
    assert v.label == "less hallucination" and v.bias == []

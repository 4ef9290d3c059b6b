"""POPE answer parsing (LLaVA eval_pope.py) and metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from mmalign.evaluation.pope import POPE_METRICS, is_unclear, parse_yes_no, pope_columns
from mmalign.evaluation.stats import point_estimates


@pytest.mark.parametrize(
    ("answer", "parsed"),
    [
        ("Yes, there is a red circle.", "yes"),
        ("Yes, there is", "yes"),
        ("Yes", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("not sure", "no"),
        ("There is no red circle in the image", "no"),
        ("No, there is not.", "no"),
        ("Yes. But no blue square.", "yes"),      # only the text before the first '.' counts
        ("I do not think so", "no"),
        ("Nope", "yes"),                          # LLaVA matches whole words only
        ("No\nthere is", "yes"),                  # split on single spaces, as the reference script does
        ("", "yes"),
    ],
)
def test_parse_yes_no_follows_llava_reference(answer, parsed):
    assert parse_yes_no(answer) == parsed


def test_pope_metrics_hand_computed():
    truth = ["yes", "no", "yes", "no", "yes", "yes"]
    parsed = ["yes", "yes", "no", "no", "yes", "no"]
    cols = pope_columns(parsed, truth)
    assert [int(cols[k].sum()) for k in ("tp", "fp", "fn", "tn")] == [2, 1, 2, 1]
    m = point_estimates(cols, POPE_METRICS)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    p, r = 2 / 3, 1 / 2
    assert m["f1"] == pytest.approx(2 * p * r / (p + r))  # = 4/7
    # yes-ratio from predictions (3/6), not from the ground truth (4/6) as lmms-eval's aggregate does
    assert m["yes_ratio"] == pytest.approx(3 / 6)
    # hallucination and coverage apart: "yes" to 1 of 2 absent objects, to 2 of 4 present ones
    assert m["fp_rate"] == pytest.approx(1 / 2) and m["tp_rate"] == pytest.approx(2 / 4)
    assert m["unclear_rate"] == 0.0


@pytest.mark.parametrize(("answer", "unclear"), [
    ("Yes.", False), ("no", False), ("I do not think so", False), ("There is a red circle.", True),
    ("Nope", True), ("", True), ("Maybe. Yes.", True),
])
def test_answers_neither_yes_nor_no_are_flagged(answer, unclear):
    assert is_unclear(answer) is unclear


def test_unclear_rate_counts_flagged_answers():
    cols = pope_columns(["yes", "yes", "no", "yes"], ["yes", "no", "no", "yes"], [True, False, False, True])
    assert point_estimates(cols, POPE_METRICS)["unclear_rate"] == pytest.approx(2 / 4)


def test_pope_precision_undefined_when_never_yes():
    cols = pope_columns(["no", "no"], ["yes", "no"])
    m = point_estimates(cols, POPE_METRICS)
    assert math.isnan(m["precision"])
    assert m["recall"] == 0.0 and m["f1"] == 0.0 and m["yes_ratio"] == 0.0 and m["accuracy"] == 0.5


def test_pope_columns_partition_samples():
    rng = np.random.default_rng(0)
    truth = rng.choice(["yes", "no"], 50).tolist()
    parsed = rng.choice(["yes", "no"], 50).tolist()
    cols = pope_columns(parsed, truth)
    np.testing.assert_array_equal(cols["tp"] + cols["fp"] + cols["fn"] + cols["tn"], np.ones(50))
    with pytest.raises(ValueError, match="predictions"):
        pope_columns(parsed[:3], truth)

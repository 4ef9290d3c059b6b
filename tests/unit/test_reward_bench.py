"""Reward-model metrics by hand: ACC over pairs, ACC+ over samples (records sharing prompt + images), ties wrong."""

from __future__ import annotations

import math

import pytest

from mmalign.data.schema import PreferenceRecord
from mmalign.evaluation.reward_bench import matrix_table, reward_metrics, sample_rows
from mmalign.sampling.reward_scoring import SlotScores


def _record(rid: str, image: str, prompt: str, k: int) -> PreferenceRecord:
    return PreferenceRecord(rid, [image], prompt, "good", [f"bad {i}" for i in range(k)])


def test_acc_and_acc_plus_by_hand():
    records = [
        _record("a", "1.png", "<image>\nQ1", 2),   # sample 1: pairs right, right
        _record("b", "2.png", "<image>\nQ2", 1),   # sample 2 (with c): right
        _record("c", "2.png", "<image>\nQ2", 1),   #                    wrong (tie)
        _record("d", "3.png", "<image>\nQ2", 1),   # sample 3 (other image): wrong
    ]
    scores = [SlotScores(2.0, [1.0, -1.0]), SlotScores(0.5, [0.0]), SlotScores(0.3, [0.3]), SlotScores(-1.0, [1.0])]
    rows = sample_rows(records, scores)
    assert [r["ids"] for r in rows] == [["a"], ["b", "c"], ["d"]]
    assert [(r["pairs"], r["correct"], r["all_correct"]) for r in rows] == [(2, 2, 1), (2, 1, 0), (1, 0, 0)]
    assert rows[1]["pairs_detail"][1] == {"id": "c", "slot": 1, "chosen_reward": 0.3, "rejected_reward": 0.3,
                                          "correct": False}
    values = reward_metrics(rows, n_boot=200, seed=0, level=0.95)
    assert values["accuracy"].value == pytest.approx(3 / 5)
    assert values["accuracy_plus"].value == pytest.approx(1 / 3)
    gaps = [1.0, 3.0, 0.5, 0.0, -2.0]
    assert values["margin"].value == pytest.approx(sum(gaps) / 5)
    assert values["loss"].value == pytest.approx(sum(math.log1p(math.exp(-g)) for g in gaps) / 5)
    assert values["accuracy"].n == 3  # resampled over samples
    assert values["accuracy"].ci_low <= 0.6 <= values["accuracy"].ci_high


def test_matrix_table_rows_are_models_and_columns_sets():
    cell = lambda v: {"metrics": {"accuracy": {"value": v, "ci_low": v - 0.1, "ci_high": v + 0.1, "n": 5}}}  # noqa
    table = matrix_table({"corrupt": {"corrupt": cell(0.9), "bdhs": cell(0.6)},
                          "bdhs": {"corrupt": cell(0.5), "bdhs": cell(0.8)}}, "accuracy")
    lines = table.splitlines()
    assert lines[0] == "| accuracy: model \\ held-out set | corrupt | bdhs |"
    assert lines[2] == "| corrupt | 0.900 [0.800, 1.000] | 0.600 [0.500, 0.700] |"
    assert lines[3].startswith("| bdhs | 0.500")

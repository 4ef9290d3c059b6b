"""The report's markdown table from a hand-made comparison."""

import math

from mmalign.evaluation.report import headline, markdown_table, run_names
from mmalign.evaluation.stats import MetricValue, PairedResult
from mmalign.evaluation.suite import Comparison

NAN = math.nan


def test_markdown_table_lists_runs_side_by_side_with_paired_tests():
    comparison = Comparison(
        names=["base", "dpo"],
        values={
            "base": {"pope/all/f1": MetricValue(0.8, 100, 0.75, 0.85),
                     "pope/all/precision": MetricValue(NAN, 100, NAN, NAN)},
            "dpo": {"pope/all/f1": MetricValue(0.9, 100, 0.86, 0.94),
                    "pope/all/precision": MetricValue(0.5, 100, 0.4, 0.6)},
        },
        tests={"dpo": {"pope/all/f1": PairedResult(0.9, 0.8, 0.1, 0.04, 0.16, 0.002, 100)}},
    )
    lines = markdown_table(comparison).splitlines()
    assert lines[0] == "| metric | base | dpo | Δ dpo − base | p |"
    assert lines[2] == ("| pope/all/f1 | 0.800 [0.750, 0.850] (n=100) | 0.900 [0.860, 0.940] (n=100) | "
                        "+0.100 [+0.040, +0.160] | 0.002 |")
    assert lines[3] == "| pope/all/precision | n/a [n/a, n/a] (n=100) | 0.500 [0.400, 0.600] (n=100) | - | - |"


def test_run_names_are_folder_names_unless_they_collide():
    assert run_names(["runs/a/eval", "runs/b"]) == {"eval": "runs/a/eval", "b": "runs/b"}
    assert run_names(["x/eval", "y/eval"]) == {"x/eval": "x/eval", "y/eval": "y/eval"}


def test_p_values_at_the_bootstrap_floor_print_as_a_bound():
    comparison = Comparison(
        names=["base", "dpo"],
        values={"base": {"chair/chair_i": MetricValue(0.2, 50, 0.15, 0.25)},
                "dpo": {"chair/chair_i": MetricValue(0.1, 50, 0.05, 0.15)}},
        tests={"dpo": {"chair/chair_i": PairedResult(0.1, 0.2, -0.1, -0.15, -0.05, 1 / 201, 50)}},
        n_boot=200,
    )
    assert markdown_table(comparison).splitlines()[2].endswith("| < 0.005 |")


def test_headline_opens_with_the_verdict_and_side_effects():
    pair = lambda a, b: PairedResult(b, a, b - a, b - a - 0.01, b - a + 0.01, 0.01, 100)  # noqa: E731
    changes = {"pope/all/fp_rate": (0.2, 0.3), "pope/all/tp_rate": (0.8, 0.9), "pope/all/yes_ratio": (0.5, 0.6),
               "chair/recall": (0.8, 0.7)}
    comparison = Comparison(
        names=["base", "dpo"],
        values={"base": {k: MetricValue(a, 100, a, a) for k, (a, _) in changes.items()},
                "dpo": {k: MetricValue(b, 100, b, b) for k, (_, b) in changes.items()}},
        tests={"dpo": {k: pair(a, b) for k, (a, b) in changes.items()}},
    )
    text = headline(comparison, {"base": "eval/base", "dpo": "eval/dpo"})
    assert text.startswith("Baseline **base** (`eval/base`).")
    assert "**dpo** (`eval/dpo`): **answer-bias shift: more 'yes' to everything**." in text
    assert "- side effects: POPE yes-ratio +0.100" in text
    table = text.splitlines()[-2:]
    assert table[0].startswith("| base | baseline | 0.200 | 0.800 | 0.500 |")
    assert table[1].startswith("| dpo | answer-bias shift: more 'yes' to everything | 0.300 (+0.100*) |")

"""The report's markdown table from a hand-made comparison."""

import math

from mmalign.evaluation.report import markdown_table, run_names
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

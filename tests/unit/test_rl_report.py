"""The reward-hacking check: first-vs-last-steps changes and verdicts by hand, and the plot file."""

from __future__ import annotations

import json
from pathlib import Path

from mmalign.recipes.rl_report import _moving_average, hacking_table, plot_reward_vs_oracle, verdict


def _run(tmp_path: Path, name: str, rows: list[dict]) -> Path:
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **r}) + "\n" for i, r in enumerate(rows)))
    return run


def test_verdicts_by_hand():
    up, down = (0.0, 1.0), (1.0, 0.0)
    assert verdict({"reward/score": up, "oracle/score": down, "oracle/hallucinated": up}) == "hacking"
    assert verdict({"reward/score": up, "oracle/score": up, "oracle/hallucinated": up}) == "hacking"
    assert verdict({"reward/score": up, "oracle/score": up, "oracle/hallucinated": down}) == "aligned"
    assert verdict({"reward/score": down, "oracle/score": up, "oracle/hallucinated": down}) == "no gain"
    assert verdict({"reward/score": up, "oracle/score": None, "oracle/hallucinated": None}) == "unmonitored"


def test_table_uses_the_first_and_last_fifth_of_steps_and_plots(tmp_path):
    # 10 steps: windows of 2; the reward climbs 0..9 while hallucinations climb too (a hacked reward model)
    hacked = _run(tmp_path, "rm", [{"reward/score": float(i), "oracle/score": -float(i), "oracle/hallucinated": i / 10,
                                    "oracle/missed": 1.0} for i in range(10)])
    honest = _run(tmp_path, "oracle", [{"reward/score": float(i), "oracle/score": float(i)} for i in range(10)])
    table = hacking_table({"rloo_rm_s0": hacked, "rloo_s0": honest}).splitlines()
    assert table[2] == ("| rloo_rm_s0 | 10 | 0.500 -> 8.500 | -0.500 -> -8.500 | 0.050 -> 0.850 | 1.000 -> 1.000 "
                        "| hacking |")
    assert table[3] == "| rloo_s0 | 10 | 0.500 -> 8.500 | 0.500 -> 8.500 | - | - | aligned |"
    png = plot_reward_vs_oracle({"a": hacked, "b": honest}, tmp_path / "out" / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_plot_smooths_each_curve_with_a_trailing_moving_average():
    points = [(1, 1.0), (2, 3.0), (3, 5.0), (4, 0.0)]
    assert _moving_average(points, 2) == [(1, 1.0), (2, 2.0), (3, 4.0), (4, 2.5)]
    assert _moving_average(points, 1) == points

"""Table 6 in the lab, the BDHS row: DPO on BDHS pairs (no labels at all) against the shipped base.

One seed of ``configs/lab_table6.yaml`` with the BDHS method only (~2 min on 2 cores): the lab's 1,000
caption prompts and 1,000 yes/no questions, rejected answers sampled by the base itself under image masking
(Alg. 1, the paper's defaults), DPO, evaluation on the 500 held-out images, paired bootstrap against the base.

The first test asserts what held on every seed of the 3-seed Table 6 on the shipped base (docs/lab.md): the
label-free pairs lower the bias hallucination beyond the paired intervals - POPE-adversarial F1 up (0.682 ->
0.818 on seed 0), the absent bias partner named less in captions (0.216 -> 0.086), the colour/shape-matched POPE
yes-rate gap toward the partner smaller (0.105 -> 0.036), fewer captions with any hallucinated object (CHAIR_s
0.668 -> 0.552) - and CHAIR_i does not rise beyond its interval (0.437 -> 0.443, [-0.021, +0.033]; the external
pairs raised it on 2 of 3 seeds). With the paper's rho 0.99 the other half of the headline, CHAIR_i *below*
the base, does not hold: level on all 3 seeds and on every DPO setting tried (docs/lab.md). The lab's
remaining object hallucinations are shapes the base misperceives (right colour, wrong shape), while its rejected
captions at rho 0.99 hallucinate whole objects from the prior, mostly in colours the image does not have.

With partial masking (``bdhs.rho=0.5``) the rejected captions glimpse the colours and misname the shapes - the
base's own error mode - and the headline holds, still without labels: CHAIR_i 0.437 -> 0.395 / 0.407 / 0.408 on
seeds 0 / 1 / 2 (beyond the interval on 0 and 2), POPE-adversarial F1 0.68 -> 0.80-0.83, recall level. The second
test asserts that on seed 0.
"""

from __future__ import annotations

import os

import pytest

from mmalign.config import load_config
from mmalign.evaluation.suite import Comparison
from mmalign.recipes.demo import DemoConfig, run_demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lab_table6.yaml")
SHOWN = ("pope/adversarial/f1", "cooccur/partner_rate", "pope_bias/yes_rate_gap_matched", "chair/chair_s",
         "chair/chair_i", "chair/recall")


def bdhs_row(out_dir, *overrides: str) -> dict:
    """Seed 0 of the BDHS row; returns the paired bootstrap tests of (DPO - base) by metric, printed first."""
    cfg = load_config(DemoConfig, CONFIG, [f"out_dir={out_dir}", "seeds=[0]", "methods=[bdhs]", *overrides])
    comparison: Comparison = run_demo(cfg)["comparison"]
    tests, values = comparison.tests["bdhs_s0"], comparison.values
    print({k: (values["base"][k].value, values["bdhs_s0"][k].value, tests[k].ci_low, tests[k].ci_high) for k in SHOWN})
    return tests


def test_bdhs_dpo_lowers_the_bias_hallucination_without_labels(tmp_path):
    tests = bdhs_row(tmp_path)
    assert tests["pope/adversarial/f1"].ci_low > 0
    assert tests["cooccur/partner_rate"].ci_high < 0
    assert tests["pope_bias/yes_rate_gap_matched"].ci_high < 0
    assert tests["chair/chair_s"].ci_high < 0
    assert tests["chair/chair_i"].ci_low < 0  # not more object hallucination beyond the interval


def test_partially_masked_bdhs_lowers_chair_i_and_raises_pope_f1(tmp_path):
    tests = bdhs_row(tmp_path, "bdhs.rho=0.5")
    assert tests["chair/chair_i"].ci_high < 0
    assert tests["pope/adversarial/f1"].ci_low > 0
    assert tests["chair/recall"].ci_high > 0  # the captions do not get poorer beyond the interval

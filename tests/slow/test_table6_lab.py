"""Table 6 in the lab, the BDHS row: DPO on BDHS pairs (no labels at all) against the shipped base.

Seed 0 of ``configs/lab_table6.yaml`` with the BDHS method only: the lab's 1,000 caption prompts and 1,000 yes/no
questions, rejected answers sampled by the base itself under image masking (Alg. 1, the paper's defaults: rho
0.99, 256 image tokens of which 2.6 stay visible per mask), DPO, evaluation on the 500 held-out images, paired
bootstrap against the base (~10 min per test alone on 2 cores; docs/lab.md has the numbers).

What held on the shipped base (docs/lab.md, 2026-12-04; its SFT labels name an absent partner at rate 0.5, so it
names the absent partner in 61 % of such captions and says "yes" to it 0.551 against 0.063 for other absent
objects of the same strata):
- plain DPO (the paper's loss) on the BDHS pairs nearly stops the base naming the absent partner in captions
  (0.613 -> 0.000) but at a coverage cost: the captions name fewer objects (recall 0.818 -> 0.692), and "yes"
  to absent objects rises (0.164 -> 0.187), so the verdict is not "less hallucination";
- with MM-RLHF's SFT term on the chosen answer (the config's ``dpo.loss.sft_weight: 1``) the same pairs give the paper's
  headline: "yes" to the absent partner 0.551 -> 0.028 (-95 %), captions naming it 0.613 -> 0.010 (-98 %),
  CHAIR_i 0.158 -> 0.030 (-81 %), each beyond its paired interval, with "yes" to present objects -0.4 points
  and recall +3.0. (The previous base, without label errors, gave -70 %, -88 % and -30 % with recall unchanged.)
"""

from __future__ import annotations

import os

import pytest

from mmalign.config import load_config
from mmalign.evaluation.verdict import verdict
from mmalign.recipes.demo import DemoConfig, run_demo

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lab_table6.yaml")
SHOWN = ("pope_bias/yes_rate_partner", "cooccur/partner_rate", "chair/chair_i", "pope/all/fp_rate",
         "pope/all/tp_rate", "chair/recall")


def bdhs_row(out_dir, *overrides: str) -> tuple[dict, dict, dict]:
    """Seed 0 of the BDHS row: (paired tests of DPO - base by metric, base values, run values), printed first."""
    cfg = load_config(DemoConfig, CONFIG, [f"out_dir={out_dir}", "seeds=[0]", "methods=[bdhs]", *overrides])
    comparison = run_demo(cfg)["comparison"]
    tests = comparison.tests["bdhs_s0"]
    base = {k: v.value for k, v in comparison.values["base"].items()}
    run = {k: v.value for k, v in comparison.values["bdhs_s0"].items()}
    print({k: (base[k], run[k], tests[k].ci_low, tests[k].ci_high) for k in SHOWN})
    return tests, base, run


def test_plain_dpo_on_bdhs_pairs_cuts_the_caption_bias_by_naming_fewer_objects(tmp_path):
    tests, base, run = bdhs_row(tmp_path, "dpo.loss.sft_weight=0")
    partner = "cooccur/partner_rate"
    assert tests[partner].ci_high < 0 and run[partner] < 0.5 * base[partner]
    assert tests["chair/recall"].ci_high < -0.02  # the cost: fewer objects named
    assert not verdict(tests).less_hallucination


def test_bdhs_dpo_with_the_sft_term_is_less_hallucination_at_full_coverage(tmp_path):
    tests, base, run = bdhs_row(tmp_path)
    assert verdict(tests).less_hallucination
    for key in ("pope_bias/yes_rate_partner", "cooccur/partner_rate"):
        assert tests[key].ci_high < 0 and run[key] <= 0.5 * base[key], key
    assert tests["chair/chair_i"].ci_high < 0 and run["chair/chair_i"] <= 0.75 * base["chair/chair_i"]
    assert run["pope/all/tp_rate"] >= base["pope/all/tp_rate"] - 0.02
    assert run["chair/recall"] >= base["chair/recall"] - 0.02

"""The shipped lab base is what its recipe makes: re-running ``assets/base/recipe.yaml`` reproduces its metrics.

Trains the staged recipe from scratch into a temporary folder (language, vision tagging, projector alignment, SFT;
26-30 min alone on 2 cores in float32, 32.5 min with one thread beside another job in bf16, docs/lab.md) and
evaluates it on the same lab. Bitwise equality is not expected across machines (bf16 autocast where the CPU has it,
thread counts), so what the base sees and its caption bias must land within 0.03 of the shipped
``eval_metrics.json``. "Yes" to the absent partner is not held to the shipped value: the same seed gave 0.453
trained in bf16 (the shipped base, an Intel Xeon with AMX) and 0.272 in float32 (an AMD EPYC), where recall,
CHAIR_i, the caption bias and POPE random F1 moved by at most 0.013 (docs/lab.md); its ratio to random absent
objects is asserted. Issue 13's targets must hold by their value: it sees (caption recall >= 0.85, and over 0.90 on
images without a bias probe; CHAIR_i on non-partner objects <= 0.10; POPE random F1 >= 0.90) and has the planted
bias in captions and in yes/no answers (the absent partner named in >= 20 % of captions whose image shows its
trigger without it: 0.226 [0.179, 0.272] on the shipped seed, so its interval is not asserted; "yes" to it >= 3x
"yes" to random absent objects of the same strata, with its interval).
"""

import json
import os

import pytest

from mmalign.config import load_config
from mmalign.recipes.pretrain import BASE_DIR, PretrainConfig, pretrain_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow

KEYS = ("pope/random/f1", "pope/all/tp_rate", "chair/chair_i", "chair/chair_i_nonpartner", "chair/recall",
        "cooccur/partner_rate")


def test_recipe_reproduces_the_shipped_base(tmp_path):
    recipe = load_config(PretrainConfig, BASE_DIR / "recipe.yaml",
                         [f"lab.out_dir={tmp_path / 'lab'}", f"run.output_dir={tmp_path / 'base'}"])
    out = pretrain_base(recipe)
    shipped = json.loads((BASE_DIR / "eval_metrics.json").read_text())["metrics"]
    again = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    for key in KEYS:
        assert again[key]["value"] == pytest.approx(shipped[key]["value"], abs=0.03), key
    assert again["chair/recall"]["value"] >= 0.85
    assert again["chair/plain/recall"]["value"] > 0.90  # where the prior does not compete with the image
    assert again["chair/chair_i_nonpartner"]["value"] <= 0.10
    assert again["pope/random/f1"]["value"] >= 0.90
    assert again["cooccur/partner_rate"]["value"] >= 0.20  # the caption-level bias
    assert again["pope_bias/yes_rate_ratio_matched"]["ci_low"] > 3.0  # the yes/no bias
    assert again["chair/chair_i"]["value"] > again["chair/chair_i_nonpartner"]["ci_high"]  # partners among errors

"""The shipped lab base is what its recipe makes: re-running ``assets/base/recipe.yaml`` reproduces its metrics.

Trains the staged recipe from scratch into a temporary folder (language, vision tagging, projector alignment,
SFT; 45 min wall on 2 shared cores with one thread, docs/lab.md) and evaluates it on the same lab. Bitwise
equality is not expected across machines (bf16 autocast where the CPU has it, thread counts), so every headline
metric must land within 0.03 of the shipped ``eval_metrics.json``; and what the base is for must hold: it sees
(recall, over 0.90 on images without a bias probe; CHAIR_i on non-partner objects, POPE random F1 near issue
13's targets) and has the planted bias in captions and in yes/no answers (issue 13's targets: the absent partner
named in >= 20 % of captions whose image shows its trigger without it, "yes" to it >= 3x "yes" to random absent
objects of the same strata).
"""

import json
import os

import pytest

from mmalign.config import load_config
from mmalign.recipes.pretrain import BASE_DIR, PretrainConfig, pretrain_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow

KEYS = ("pope/random/f1", "pope/adversarial/f1", "pope/all/fp_rate", "pope/all/tp_rate", "chair/chair_i",
        "chair/chair_i_nonpartner", "chair/recall", "cooccur/partner_rate", "pope_bias/yes_rate_partner")


def test_recipe_reproduces_the_shipped_base(tmp_path):
    recipe = load_config(PretrainConfig, BASE_DIR / "recipe.yaml",
                         [f"lab.out_dir={tmp_path / 'lab'}", f"run.output_dir={tmp_path / 'base'}"])
    out = pretrain_base(recipe)
    shipped = json.loads((BASE_DIR / "eval_metrics.json").read_text())["metrics"]
    again = json.loads((out / "eval" / "metrics.json").read_text())["metrics"]
    for key in KEYS:
        assert again[key]["value"] == pytest.approx(shipped[key]["value"], abs=0.03), key
    assert again["chair/recall"]["value"] > 0.80
    assert again["chair/plain/recall"]["value"] > 0.90  # where the prior does not compete with the image
    assert again["chair/chair_i_nonpartner"]["value"] < 0.10
    assert again["pope/random/f1"]["value"] > 0.90
    assert again["cooccur/partner_rate"]["ci_low"] > 0.20  # the caption-level bias
    assert again["pope_bias/yes_rate_ratio_matched"]["ci_low"] > 3.0  # the yes/no bias
    assert again["chair/chair_i"]["value"] > again["chair/chair_i_nonpartner"]["ci_high"]  # partners among errors

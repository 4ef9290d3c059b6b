"""On the shipped lab base model, the likelihood and generation POPE scorers give the same parsed answers.

Runs both scorers over the POPE questions of a freshly built lab evaluation split (120 images) and checks
that they agree on at least 98% of the questions while the model answers both "Yes." and "No." often
(agreement on a model that always says yes would prove nothing). Needs the shipped base
(``mmalign.recipes.pretrain.BASE_DIR``); measured passing with a 750-step lab SFT model in its place (19 s).
"""

import os

import pytest

from mmalign.config import load_config
from mmalign.evaluation.scoring import score_pope_generate, score_pope_likelihood
from mmalign.evaluation.suite import EvalConfig, load_inputs
from mmalign.lab.build import LabConfig, build_lab
from mmalign.recipes.pretrain import load_lab_base

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.slow


def test_scorers_agree_on_the_lab_base_model(tmp_path):
    lab = build_lab(load_config(LabConfig, None, [f"out_dir={tmp_path / 'lab'}", "sizes.sft=10", "sizes.pref=10",
                                                  "sizes.eval=120"]))
    inputs = load_inputs(load_config(EvalConfig, None, [f"lab_dir={lab}", "captions.file="]))
    model, processor = load_lab_base()
    by_likelihood = score_pope_likelihood(model, processor, inputs.pope_items, inputs.pope_images, batch_size=32)
    by_generation = score_pope_generate(model, processor, inputs.pope_items, inputs.pope_images, batch_size=32)
    n = len(by_likelihood)
    agree = sum(a["parsed"] == b["parsed"] for a, b in zip(by_likelihood, by_generation))
    yes = sum(r["parsed"] == "yes" for r in by_generation)
    assert 0.2 * n <= yes <= 0.8 * n
    assert agree >= 0.98 * n

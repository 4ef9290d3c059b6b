"""The lab's RL study end to end on a reduced lab and a tiny random base: every method trains and is evaluated,
the RL runs feed the reward-hacking table and plot (an untrained reward model for the *_rm path), a rerun resumes."""

from __future__ import annotations

import pytest
import torch

from mmalign.config import load_config
from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.recipes.rl_study import RLStudyConfig, run_rl_study
from mmalign.recipes.rl_report import read_metrics
from mmalign.models.heads import ScalarHeadModel, save_reward_model

pytestmark = pytest.mark.integration


def test_reduced_rl_study_runs_every_method_and_resumes(tmp_path, caplog):
    model, processor = build_lab_model(LabModelConfig(vision_hidden=32, text_hidden=64, text_layers=2, heads=2))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    save_reward_model(ScalarHeadModel(model), processor, tmp_path / "rm")  # untrained head: plumbing only
    overrides = [f"out_dir={tmp_path / 'study'}", f"base={tmp_path / 'base'}", f"reward_model={tmp_path / 'rm'}",
                 "seeds=[0]", "methods=[dpo,online_dpo,rloo,grpo,ppo,rloo_rm]", "steps=2", "batch_size=4",
                 "lab.sizes.sft=8", "lab.sizes.pref=16", "lab.sizes.eval=4", "eval.stats.n_boot=20",
                 "online.rollout.max_new_tokens=8", "rloo.rollout.max_new_tokens=8", "ppo.rollout.max_new_tokens=8",
                 "eval.captions.max_new_tokens=8", "eval_limit=6"]
    result = run_rl_study(load_config(RLStudyConfig, None, overrides))
    study = tmp_path / "study"
    assert list(result["runs"]) == ["base", "dpo_s0", "online_dpo_s0", "rloo_s0", "grpo_s0", "ppo_s0", "rloo_rm_s0"]
    for name in ("rloo", "grpo", "ppo", "rloo_rm"):
        log = read_metrics(study / "seed_0" / name)
        assert len(log) == 2 and all("oracle/score" in m for m in log)
        assert f"| {name}_s0 | 2 |" in result["hacking"]
    rm_log = read_metrics(study / "seed_0/rloo_rm")
    assert rm_log[0]["reward/score"] != rm_log[0]["oracle/score"]  # the RM's reward, the oracle logged beside it
    assert (study / "report/reward_vs_oracle.png").is_file() and "dpo_s0" not in result["hacking"]
    assert (study / "eval_files/eval_pope_6.jsonl").read_text().count("\n") == 6
    caplog.set_level("INFO")
    again = run_rl_study(load_config(RLStudyConfig, None, overrides))
    assert "skipping" in caplog.text and again["hacking"] == result["hacking"]

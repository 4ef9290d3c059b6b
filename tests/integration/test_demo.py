"""The demo end to end on a reduced lab: every stage runs, the report holds every run, a rerun resumes."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmalign.config import ConfigError, load_config
from mmalign.recipes.demo import DemoConfig, headline_table, run_demo

pytestmark = pytest.mark.integration

MICRO_MODEL = {"image_size": 32, "vision_hidden": 32, "vision_layers": 1, "text_hidden": 32, "text_layers": 1,
               "heads": 2}
REDUCED = [
    "base=recipe", "methods=[external,external_bdhs,external_povid,external_online_bdhs,sft_control]",
    "lab.sizes.sft=48", "lab.sizes.pref=16", "lab.sizes.eval=8", "lab.sizes.vision=16", "lab.world.image_size=32",
    "lab.world.min_size=8", "lab.world.max_size=14", *[f"pretrain.model.{k}={v}" for k, v in MICRO_MODEL.items()],
    *[f"pretrain.{s}.steps=2" for s in ("language", "vision", "align")], "pretrain.sft.steps=6",
    *[f"pretrain.{s}.batch_size=8" for s in ("language", "vision", "align", "sft")],
    "dpo.max_steps=2", "dpo.batch_size=4", "dpo.data.max_length=128", "bdhs.n_iter=2", "eval.stats.n_boot=20",
]


def test_reduced_demo_runs_every_stage_and_resumes(tmp_path, caplog):
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}", f"pretrain.run.output_dir={tmp_path}/base", *REDUCED])
    result = run_demo(cfg)
    assert list(result["runs"]) == ["base", "external_s0", "external_bdhs_s0", "external_povid_s0",
                                    "external_online_bdhs_s0", "sft_control_s0"]
    # external pairs: one corrupted rejected; external + BDHS: the corruption first, the BDHS answer last (Eq. 5)
    external = [json.loads(line) for line in (tmp_path / "seed_0/pairs/external.jsonl").read_text().splitlines()]
    both = [json.loads(line) for line in (tmp_path / "seed_0/pairs/external_bdhs.jsonl").read_text().splitlines()]
    assert len(external) == 16 and all(len(r["rejected"]) == 1 for r in external)
    by_id = {r["id"]: r for r in external}
    assert all(len(r["rejected"]) == 2 and r["rejected"][0] == by_id[r["id"]]["rejected"][0] for r in both)
    trained = yaml.safe_load((tmp_path / "seed_0/dpo_external_bdhs/config.yaml").read_text())
    assert trained["loss"]["rejected_weights"] == [0.5, 0.5] and trained["data"]["data_root"] == str(tmp_path / "lab")
    assert not trained["povid"]["enabled"]
    # external + POVID: the external pairs, the POVID slot made in the trainer
    povid = yaml.safe_load((tmp_path / "seed_0/dpo_external_povid/config.yaml").read_text())
    assert povid["povid"]["enabled"] and povid["data"]["train"] == str(tmp_path / "seed_0/pairs/external.jsonl")
    # external + online BDHS: the online trainer on the external pairs, BDHS answers made during training
    online = yaml.safe_load((tmp_path / "seed_0/dpo_external_online_bdhs/config.yaml").read_text())
    assert online["mode"] == "online_bdhs"
    assert online["data"]["prompts"] == str(tmp_path / "seed_0/pairs/external.jsonl")
    # the control: the external pairs' chosen answers, the preference term off; every other run against it
    control = yaml.safe_load((tmp_path / "seed_0/dpo_sft_control/config.yaml").read_text())
    assert control["loss"]["name"] == "none" and control["loss"]["sft_weight"] == 1.0
    assert control["data"]["train"] == str(tmp_path / "seed_0/pairs/external.jsonl")
    versus = result["vs_control"][0]
    assert versus.names == ["sft_control_s0", "external_s0", "external_bdhs_s0", "external_povid_s0",
                            "external_online_bdhs_s0"]
    assert (tmp_path / "report/vs_sft_control_s0/report.md").read_text().startswith(
        "# Evaluation report\n\nBaseline **sft_control_s0**")
    section = (tmp_path / "report/report.md").read_text().split("## Against the SFT-only control")[1]
    assert section.index("**external_s0**") < section.index("## All metrics")
    summary = (tmp_path / "report/summary.md").read_text()
    assert "## Against the SFT-only control" in summary and "| method | verdicts vs sft_control |" in summary
    report = (tmp_path / "report" / "report.md").read_text()
    assert all(name in report for name in result["runs"])
    assert report.startswith("# Evaluation report\n\nBaseline **base**")  # the verdicts come first
    table = headline_table(result["comparison"])
    assert table.count("\n") == 2 + 6  # header, rule, one row per run

    caplog.set_level("INFO")
    again = run_demo(cfg)  # every stage's output exists: nothing is recomputed
    assert "skipping" in caplog.text and "dpo (" not in caplog.text
    assert headline_table(again["comparison"]) == table


def test_full_fine_tuning_evaluates_the_whole_trained_weights(tmp_path):
    overrides = [*REDUCED, "methods=[external]", "dpo.lora.enabled=false", "dpo.model.freeze_vision=false"]
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}", f"pretrain.run.output_dir={tmp_path}/base", *overrides])
    run_demo(cfg)
    run = tmp_path / "seed_0/dpo_external"
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert not trained["lora"]["enabled"] and not trained["merge_weights"] and not (run / "merged").exists()
    evaluated = yaml.safe_load((tmp_path / "eval/external_s0/config.yaml").read_text())
    assert evaluated["model"] == str(run / "model")
    base, tuned = (load_file(next(Path(d).glob("*.safetensors"))) for d in (trained["model"]["path"], run / "model"))
    vision = [k for k in tuned if "vision_tower" in k]
    assert vision and any(not torch.equal(base[k], tuned[k]) for k in vision)  # the tower trained too


def test_the_control_needs_the_sft_term(tmp_path):
    refused = "sft_control trains the DPO template with loss.name=none: .* set loss.sft_weight > 0"
    with pytest.raises(ValueError, match=refused):
        load_config(DemoConfig, None, [f"out_dir={tmp_path}", "dpo.loss.sft_weight=0"])


def test_shipped_base_needs_the_lab_it_was_trained_on(tmp_path):
    cfg = load_config(DemoConfig, None, [f"out_dir={tmp_path}", "lab.p=0.5"])
    with pytest.raises(ConfigError, match="trained on another lab"):
        run_demo(cfg)

"""The lab's reward-model study end to end on a reduced lab and a tiny random base: every pair source is made and
split, one reward model per source plus the critique one are trained, the cross-set matrix is filled, the DPO pairs
are scored, the three DPO variants train and are evaluated; a rerun resumes. Plus the online source's pairing rule."""

from __future__ import annotations

import json

import pytest

from mmalign.config import load_config
from mmalign.data.schema import PreferenceRecord
from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.recipes.rm_study import (
    SOURCES, RMStudyConfig, is_heldout, oracle_pair_records, run_rm_study, seeds_matrix,
)
from mmalign.sampling.annotators import Annotation, RolloutGroup


def _group(answers: list[str]) -> RolloutGroup:
    return RolloutGroup(PreferenceRecord("p1", ["a.png"], "<image>\nDescribe the image.", "ref", [], "lab",
                                         {"objects": ["red circle"]}), [], answers)


def test_online_source_pairs_best_with_worst_and_drops_empty_answers_and_ties():
    groups = [_group(["There is a red circle.", "There is a blue square.", "x"]), _group(["", "There is a red circle."]),
              _group(["There is a red circle.", "There is a red circle."])]
    annotations = [Annotation(0, 1, {"scores": [0, -2, -1]}), Annotation(1, 0, {"scores": [-1, 0]}),
                   Annotation(None, None, {"scores": [0, 0]})]
    records = oracle_pair_records(groups, annotations)
    assert len(records) == 1  # the empty rejected answer and the tie are dropped
    assert (records[0].id, records[0].chosen, records[0].rejected) == ("p1", "There is a red circle.",
                                                                      ["There is a blue square."])
    assert records[0].meta == {"objects": ["red circle"], "oracle_scores": [0, -2, -1]}


def test_reward_model_matrix_over_seeds_is_mean_and_range_per_cell():
    def cell(value: float) -> dict:
        return {"metrics": {"accuracy": {"value": value}}}

    seeds = {0: {"bt": {"a": cell(0.9), "b": cell(0.5)}}, 1: {"bt": {"a": cell(0.7), "b": cell(0.6)}}}
    assert seeds_matrix(seeds).splitlines()[2] == "| bt | 0.800 (0.700-0.900) | 0.550 (0.500-0.600) |"
    assert seeds_matrix({0: seeds[0]}).splitlines()[2] == "| bt | 0.900 | 0.500 |"


@pytest.mark.integration
def test_reduced_rm_study_runs_every_stage_and_resumes(tmp_path):
    model, processor = build_lab_model(LabModelConfig(vision_hidden=32, text_hidden=64, text_layers=2, heads=2))
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    overrides = [f"out_dir={tmp_path / 'study'}", f"base={tmp_path / 'base'}", "seeds=[0]", "lab.sizes.sft=8",
                 "lab.sizes.pref=24", "lab.sizes.eval=4", "heldout_share=0.3", "online_k=2", "povid_noise_steps=100",
                 "rm.epochs=1", "rm.batch_size=4", "dpo.epochs=1", "dpo.batch_size=4", "bdhs.max_answer_tokens=16",
                 "score.scorer.critique_tokens=8", "rm_eval.scorer.critique_tokens=8", "rm_eval.n_boot=20",
                 "eval.stats.n_boot=20", "eval.captions.max_new_tokens=8"]
    result = run_rm_study(load_config(RMStudyConfig, None, overrides))
    seed = tmp_path / "study" / "seed_0"
    for source in SOURCES:
        train = [json.loads(x) for x in (seed / "pairs" / f"{source}_train.jsonl").read_text().splitlines()]
        heldout = [json.loads(x) for x in (seed / "pairs" / f"{source}_heldout.jsonl").read_text().splitlines()]
        assert not any(is_heldout(r["id"], 0.3) for r in train) and all(is_heldout(r["id"], 0.3) for r in heldout)
        assert all(r["chosen"].strip() and all(a.strip() for a in r["rejected"]) for r in train + heldout)
        assert (seed / "rm" / source / "reward_model" / "reward_head.safetensors").is_file()
    assert (seed / "rm" / "critique" / "reward_model" / "reward_head.safetensors").is_file()
    matrix = (seed / "rm_matrix" / "matrix.md").read_text()
    assert all(f"| {m} |" in matrix for m in (*SOURCES, "critique"))
    given = json.loads((seed / "critique_given" / "metrics.json").read_text())
    assert given["metrics"]["accuracy"]["n"] > 0 and "critique RM, exact critiques" in result["over_seeds"]
    scored = [json.loads(x) for x in (seed / "pairs" / "corrupt_train_scored.jsonl").read_text().splitlines()]
    assert scored and all(len(r["meta"]["reward_margins"]) == len(r["rejected"]) for r in scored)
    assert list(result["runs"]) == ["base", "dpo_s0", "dpo_sft_s0", "mm_dpo_s0"]
    assert "chair/chair_i" in result["table"] and "mm_dpo" in result["table"]
    trained = sorted((tmp_path / "study").rglob("*.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in trained]
    again = run_rm_study(load_config(RMStudyConfig, None, overrides))
    assert again["table"] == result["table"]
    assert [p.stat().st_mtime_ns for p in trained] == stamps  # nothing retrained on the rerun

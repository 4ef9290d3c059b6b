"""``mmalign score`` and ``mmalign eval rm`` / ``rm-matrix`` on a tiny trained reward model: margins per slot written,
read back and used by MM-DPO; finished shard entries never recomputed; evaluation and matrix files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_offline_train import config, make_pairs, metrics
from test_reward_model import rm_config

from mmalign.cli.main import main
from mmalign.data.images import open_image
from mmalign.data.record_files import provenance_path, read_records
from mmalign.models.heads import read_spec
from mmalign.sampling.reward_scoring import ScorerConfig, load_scorer
from mmalign.sampling.score_run import ScoreConfig, _fingerprint
from mmalign.sampling.shards import ShardWriter, init_work_dir, work_dir_for
from mmalign.trainers.offline import train_offline
from mmalign.trainers.reward_model import MODEL_DIR, train_reward_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("score_pairs"), n=16, seed=2)


@pytest.fixture(scope="module")
def reward_model(tiny_vlm_dir, pairs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rm")
    return train_reward_model(rm_config(tiny_vlm_dir("llava"), pairs, out / "run", "max_steps=4")) / MODEL_DIR


def test_score_writes_margins_per_slot_that_mm_dpo_reads(tiny_vlm_dir, pairs, reward_model, tmp_path):
    output = pairs.parent / "scored.jsonl"
    assert main(["score", f"input={pairs}", f"output={output}", f"model={reward_model}", "scorer.batch_size=5"]) == 0
    records, scored = read_records(pairs), read_records(output)
    direct = load_scorer(reward_model).score_records(
        records, [[open_image(i, pairs.parent) for i in r.images] for r in records])
    for record, out, expected in zip(records, scored, direct, strict=True):
        rewards = out.meta["rewards"]
        assert out.meta["reward_margins"] == pytest.approx([rewards["chosen"] - r for r in rewards["rejected"]])
        assert len(out.meta["reward_margins"]) == len(record.rejected)
        assert [rewards["chosen"], *rewards["rejected"]] == pytest.approx([expected.chosen, *expected.rejected],
                                                                          abs=1e-5)
        assert (out.id, out.chosen, out.rejected) == (record.id, record.chosen, record.rejected)
    provenance = json.loads(provenance_path(output).read_text())
    assert provenance["model"] == str(reward_model) and provenance["model_kind"] == "bradley_terry"
    assert provenance["model_config_hash"] == read_spec(reward_model).config_hash and provenance["count"] == 16
    assert {r.meta["rewards"]["scorer"] for r in scored} == {provenance["config_hash"]}
    assert not work_dir_for(output).exists()
    out = train_offline(config(tiny_vlm_dir("llava"), output, tmp_path / "dpo", "loss.dynamic_beta=true",
                               "max_steps=1", "loss.beta_w=1.0"))
    beta = metrics(out)[0]["beta"]
    assert 0.1 < beta < 0.2  # beta0 (1 + w (1 - e^{-k delta})) per slot, margins of the trained RM


def test_score_resumes_from_shards_without_recomputing(pairs, reward_model):
    output = pairs.parent / "resumed.jsonl"
    cfg = ScoreConfig(input=str(pairs), output=str(output), model=str(reward_model), scorer=ScorerConfig(batch_size=4))
    work = work_dir_for(output)
    init_work_dir(work, _fingerprint(cfg))
    first = read_records(pairs)[0]
    planted = {"id": first.id, "chosen": 123.0, "rejected": [1.0] * len(first.rejected), "critiques": None}
    ShardWriter(work, 0).append([planted])
    with open(work / "shard-00000.jsonl", "a") as handle:
        handle.write('{"id": "r1", "chosen": 9')  # a writer killed mid-line
    assert main(["score", f"input={pairs}", f"output={output}", f"model={reward_model}", "scorer.batch_size=4"]) == 0
    scored = read_records(output)
    assert scored[0].meta["rewards"]["chosen"] == 123.0  # finished before the "kill": kept, not recomputed
    assert scored[1].meta["rewards"]["chosen"] != 9 and len(scored) == 16
    again = pairs.parent / "resumed_other.jsonl"
    init_work_dir(work_dir_for(again), _fingerprint(cfg))  # a folder of the first settings ...
    assert main(["score", f"input={pairs}", f"output={again}", f"model={reward_model}", "scorer.batch_size=3"]) == 2


def test_eval_rm_and_the_cross_set_matrix(tiny_vlm_dir, pairs, reward_model, tmp_path, capsys):
    heldout = make_pairs(tmp_path / "heldout", n=8, seed=9)
    assert main(["eval", "rm", f"data={heldout}", f"model={reward_model}", f"out_dir={tmp_path / 'e'}",
                 "n_boot=50"]) == 0
    result = json.loads((tmp_path / "e" / "metrics.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "e" / "samples.jsonl").read_text().splitlines()]
    correct = sum(p["correct"] for r in rows for p in r["pairs_detail"])
    n_pairs = sum(len(r["pairs_detail"]) for r in rows)
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(correct / n_pairs)
    assert result["metrics"]["accuracy"]["n"] == 8 and "accuracy" in capsys.readouterr().out
    other = train_reward_model(rm_config(tiny_vlm_dir("llava"), heldout, tmp_path / "rm2", "max_steps=1"))
    yaml = tmp_path / "matrix.yaml"
    yaml.write_text(f"models: {{first: {reward_model}, second: {other / MODEL_DIR}}}\n"
                    f"sets: {{train: {pairs}, heldout: {heldout}}}\nout_dir: {tmp_path / 'm'}\neval: {{n_boot: 50}}\n")
    assert main(["eval", "rm-matrix", "--config", str(yaml)]) == 0
    matrix = json.loads((tmp_path / "m" / "matrix.json").read_text())
    assert matrix["first"]["heldout"]["metrics"] == result["metrics"]
    table = (tmp_path / "m" / "matrix.md").read_text()
    assert "| first |" in table and "| second |" in table and "ACC" not in table
    assert main(["eval", "rm", f"data={heldout}", "model=/nonexistent"]) == 1

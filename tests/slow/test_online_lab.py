"""Lab effects of online alignment (slow, one seed; the >= 3-seed study is in docs/lab.md, "Online and mixed DPO").

On the lab base model and the lab's preference prompts, 60 steps of batch 16 each:
- Mixed-DPO (offline exact-corruption pairs half of the time) removes most of the planted co-occurrence bias:
  the share of trigger-naming eval captions that also name the absent partner falls far below the base's;
- Online-DPO with the exact oracle makes fewer oracle errors (hallucinated + missed objects per eval caption)
  than Online-DPO with a coin-flip annotator (error rate 0.5), which carries no preference signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mmalign.config import load_config
from mmalign.data.record_files import read_records, write_records
from mmalign.evaluation.suite import EvalConfig, PopeConfig, evaluate
from mmalign.lab.corrupt import corrupt_lab_records
from mmalign.recipes.pretrain import PretrainConfig, pretrain_base
from mmalign.trainers.online import OnlineConfig, train_online

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> dict[str, Path]:
    """The lab base model by its recipe (cached by ``pretrain_base``) and the exactly corrupted preference pairs."""
    root = tmp_path_factory.mktemp("online_lab")
    cfg = load_config(PretrainConfig, ROOT / "configs/lab_pretrain.yaml",
                      [f"lab.out_dir={root / 'lab'}", f"run.output_dir={root / 'base'}"])
    base = pretrain_base(cfg)
    lab_dir = Path(cfg.lab.out_dir)
    bias = json.loads((lab_dir / "bias.json").read_text())["pairs"]
    pairs = lab_dir / "pairs_corrupt.jsonl"
    write_records(pairs, corrupt_lab_records(read_records(lab_dir / "pref_prompts.jsonl"), bias, seed=0))
    return {"lab": lab_dir, "base": base, "pairs": pairs}


def _train_and_eval(lab: dict[str, Path], config: str, out: Path, *overrides: str) -> dict[str, float]:
    cfg = load_config(OnlineConfig, ROOT / "configs" / config, [
        f"model.path={lab['base']}", f"data.prompts={lab['pairs']}", f"data.data_root={lab['lab']}",
        f"annotator.synonyms={lab['lab'] / 'vocab/synonyms.txt'}", f"run.output_dir={out}", f"max_steps={STEPS}",
        "optim.lr=1e-3", "run.save_every=0", "run.report_to=none", *overrides])
    trained = train_online(cfg)
    return _caption_metrics(lab, trained / "merged", out / "eval")


def _caption_metrics(lab: dict[str, Path], model: Path, out: Path) -> dict[str, float]:
    result = evaluate(EvalConfig(model=str(model), lab_dir=str(lab["lab"]), out_dir=str(out), batch_size=64,
                                 pope=PopeConfig(file="")))
    rows = [json.loads(line) for line in (out / "samples_captions.jsonl").read_text().splitlines()]
    errors = np.mean([len(set(r["hallucinated"])) + len(set(r["truth"]) - set(r["correct"])) for r in rows])
    return {"errors": float(errors),
            "partner_given_trigger": result["metrics"]["cooccur/partner_rate_given_trigger"]["value"]}


def test_mixed_removes_bias_and_oracle_beats_coin_flip_annotator(lab, tmp_path):
    base = _caption_metrics(lab, lab["base"], tmp_path / "base_eval")
    mixed = _train_and_eval(lab, "lab_mixed.yaml", tmp_path / "mixed")
    strong = _train_and_eval(lab, "lab_online.yaml", tmp_path / "oracle")
    coin = _train_and_eval(lab, "lab_online_noisy.yaml", tmp_path / "coin", "annotator.error_rate=0.5")
    assert mixed["partner_given_trigger"] < base["partner_given_trigger"] - 0.2, (base, mixed)
    assert strong["errors"] < coin["errors"], (strong, coin)

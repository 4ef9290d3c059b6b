"""The README's real-model path end to end on every tiny family saved to a local folder: convert a published
set (RLAIF-V shards) -> ``sample bdhs`` -> ``train dpo`` (LoRA, merged weights) -> ``eval bench`` on the
official-format POPE and Object HalBench files, all through the CLI; the merged folder loads as plain HF
(``AutoModelForImageTextToText`` / ``AutoProcessor``), which is what lmms-eval's HF model wrappers load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from mmalign.cli.main import main
from mmalign.data.record_files import read_records
from mmalign.models.tiny import FAMILIES

pytestmark = pytest.mark.integration
ASSETS = Path(__file__).parents[1] / "assets"
BENCH = ASSETS / "benchmarks"


@pytest.mark.parametrize("family", FAMILIES)
def test_convert_sample_train_evaluate(tiny_vlm_dir, tmp_path, family):
    model_dir = tiny_vlm_dir(family)
    shards = sorted(str(p) for p in (ASSETS / "data" / "rlaif_v").glob("*.parquet"))
    pairs, bdhs = tmp_path / "pairs.jsonl", tmp_path / "bdhs.jsonl"
    assert main(["data", "convert", "--format", "rlaif_v", *shards, str(pairs)]) == 0
    assert main(["sample", "bdhs", f"input={pairs}", f"output={bdhs}", f"model={model_dir}", "bdhs.n_iter=2",
                 "bdhs.max_sentence_tokens=4", "bdhs.max_answer_tokens=6"]) == 0
    records = read_records(bdhs, min_rejected=2)  # the BDHS answer in front of the set's own rejected one
    assert len(records) == 3 and all(r.meta["bdhs"]["iteration"] in (1, 2) for r in records)

    out = tmp_path / "dpo"
    assert main(["train", "dpo", f"model.path={model_dir}", f"data.train={bdhs}", f"run.output_dir={out}",
                 "batch_size=3", "max_steps=1", "lora.rank=4", "lora.alpha=8", "run.report_to=none",
                 "merge_weights=true"]) == 0
    merged = out / "merged"
    model = AutoModelForImageTextToText.from_pretrained(merged, local_files_only=True)
    assert model.config.model_type == family and AutoProcessor.from_pretrained(merged, local_files_only=True)

    pope = [str(p) for p in sorted((BENCH / "pope").glob("*.json"))]
    assert main(["eval", "bench", "benchmark=pope", f"model={merged}", f"out_dir={tmp_path / 'pope'}",
                 f"pope.files={json.dumps(pope)}", f"pope.images={BENCH / 'coco' / 'val2014'}",
                 "pope.max_new_tokens=4"]) == 0
    metrics = json.loads((tmp_path / "pope" / "metrics.json").read_text())["metrics"]
    assert metrics["pope/all/accuracy"]["n"] == 6 and metrics["pope/adversarial/f1"]["n"] == 3
    coco = BENCH / "coco"
    assert main(["eval", "bench", "benchmark=chair", f"model={merged}", f"out_dir={tmp_path / 'chair'}",
                 f"chair.questions={BENCH / 'object_halbench' / 'obj_halbench_300_with_image.jsonl'}",
                 f"chair.instances={coco / 'annotations' / 'instances_val2014.json'}",
                 f"chair.captions={coco / 'annotations' / 'captions_val2014.json'}",
                 f"chair.synonyms={coco / 'synonyms.txt'}", "chair.max_new_tokens=6"]) == 0
    assert json.loads((tmp_path / "chair" / "metrics.json").read_text())["metrics"]["chair/recall"]["n"] == 2

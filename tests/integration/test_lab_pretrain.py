"""End to end on a reduced lab: build, a few SFT steps, save/reload, exact resume, the cached CLI recipe."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmalign.cli.main import main
from mmalign.config import load_config
from mmalign.data.collate import collate_sft
from mmalign.data.record_files import read_records
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.models.loading import load_vlm
from mmalign.trainers.sft import SFTConfig, train_sft

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).parents[2] / "configs" / "lab_pretrain.yaml"

MICRO = ["model.lab.vision_hidden=32", "model.lab.vision_layers=1", "model.lab.text_hidden=32",
         "model.lab.text_layers=1", "model.lab.heads=2"]


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    cfg = LabConfig(out_dir=str(tmp_path_factory.mktemp("lab")), sizes=SplitSizes(sft=24, pref=4, eval=6))
    return build_lab(cfg)


def _sft(lab_dir, out, steps, resume=False, extra=()):
    overrides = [f"data.train={lab_dir / 'sft_train.jsonl'}", f"run.output_dir={out}", f"steps={steps}",
                 "batch_size=8", "run.save_every=2", "run.report_to=none", "run.log_every=1",
                 "optim.schedule=constant", "optim.warmup_ratio=0.0", f"run.resume={str(resume).lower()}", *MICRO,
                 *extra]
    return train_sft(load_config(SFTConfig, overrides=overrides))


def _logits(model, processor, lab_dir):
    records = read_records(lab_dir / "sft_train.jsonl")[:4]
    images = [[Image.open(lab_dir / r.images[0]).convert("RGB")] for r in records]
    batch = collate_sft(processor, records, images)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_sft_trains_saves_reloads_and_resumes_exactly(lab_dir, tmp_path, dropout):
    extra = [f"image_dropout={dropout}"]
    out = _sft(lab_dir, tmp_path / "full", 4, extra=extra)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model, processor = load_vlm(out)
    again, _ = load_vlm(out)
    reference = _logits(model, processor, lab_dir)
    assert torch.equal(reference, _logits(again, processor, lab_dir))
    # stop after 2 steps, then continue to 4: same weights as the uninterrupted run
    _sft(lab_dir, tmp_path / "split", 2, extra=extra)
    resumed = _sft(lab_dir, tmp_path / "split", 4, resume=True, extra=extra)
    model_b, _ = load_vlm(resumed)
    torch.testing.assert_close(_logits(model_b, processor, lab_dir), reference, rtol=1e-5, atol=1e-5)


def test_image_dropout_changes_training_but_not_with_the_accumulation_split(lab_dir, tmp_path):
    """Hidden examples are drawn per record, so 1 x 8 and 4 x 2 micro-batches train the same weights."""
    model, processor = load_vlm(_sft(lab_dir, tmp_path / "plain", 2))
    one = _sft(lab_dir, tmp_path / "one", 2, extra=["image_dropout=0.5"])
    four = _sft(lab_dir, tmp_path / "four", 2, extra=["image_dropout=0.5", "optim.grad_accum=4"])
    model_one, _ = load_vlm(one)
    model_four, _ = load_vlm(four)
    reference = _logits(model_one, processor, lab_dir)
    torch.testing.assert_close(_logits(model_four, processor, lab_dir), reference, rtol=1e-5, atol=1e-5)
    assert (_logits(model, processor, lab_dir) - reference).abs().max() > 1e-4


def test_pretrain_cli_builds_trains_evaluates_and_caches(tmp_path):
    args = ["lab", "pretrain", "--config", str(CONFIG), f"lab.out_dir={tmp_path / 'lab'}",
            f"run.output_dir={tmp_path / 'base'}", "lab.sizes.sft=16", "lab.sizes.pref=2", "lab.sizes.eval=4",
            "steps=2", "batch_size=8", "run.save_every=0", "run.report_to=none",
            # one Accelerator config per process: the other in-process runs of the suite use fp32
            "run.mixed_precision='no'",
            *[o.replace("model.lab.", "model.") for o in MICRO]]
    assert main(args) == 0
    weights = tmp_path / "base" / "model.safetensors"
    metrics = json.loads((tmp_path / "base" / "eval" / "metrics.json").read_text())
    for key in ("pope/adversarial/accuracy", "chair/chair_i", "cooccur/partner_rate", "pope_bias/yes_rate_gap"):
        assert key in metrics["metrics"]
    assert metrics["bias_pairs"] == [["red circle", "blue square"], ["green triangle", "yellow cross"],
                                     ["yellow circle", "green square"]]
    stamp = weights.stat().st_mtime_ns
    assert main(args) == 0
    assert weights.stat().st_mtime_ns == stamp  # cached: not retrained

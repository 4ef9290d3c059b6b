"""SFT on multi-turn records (a lab built with ``questions_per_turn_record``): the logged loss is the token
mean over every answer of the global batch, 1 x 8 and 4 x 2 micro-batches train the same weights, and a
resumed run ends where an uninterrupted one does."""

import json

import pytest
import torch
from PIL import Image

from mmalign.config import load_config
from mmalign.data.collate import collate_turns
from mmalign.data.record_files import read_records
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.lab.world import WorldConfig
from mmalign.models.loading import load_vlm
from mmalign.models.logprobs import answer_token_logps
from mmalign.trainers.common import batch_indices
from mmalign.trainers.sft import SFTConfig, train_sft

pytestmark = pytest.mark.integration

MICRO = {"image_size": 32, "vision_hidden": 32, "vision_layers": 1, "text_hidden": 32, "text_layers": 1, "heads": 2}


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    cfg = LabConfig(out_dir=str(tmp_path_factory.mktemp("lab")), world=WorldConfig(image_size=32, min_size=8, max_size=14),
                    sizes=SplitSizes(sft=12, pref=1, eval=1, vision=1), questions_per_image=3,
                    questions_per_turn_record=3)
    return build_lab(cfg)


@pytest.fixture(scope="module")
def fresh_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("init")
    model, processor = build_lab_model(LabModelConfig(**MICRO), seed=0)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _sft(lab_dir, model, out, steps, resume=False, extra=()):
    overrides = [f"model.path={model}", f"data.train={lab_dir / 'sft_train.jsonl'}", f"run.output_dir={out}",
                 f"steps={steps}", "batch_size=8", "run.save_every=1", "run.report_to=none", "run.log_every=1",
                 "run.mixed_precision='no'", "optim.schedule=constant", "optim.warmup_ratio=0.0", "data.max_length=128",
                 f"run.resume={str(resume).lower()}", *extra]
    return train_sft(load_config(SFTConfig, overrides=overrides))


def _images(lab_dir, records):
    return [[Image.open(lab_dir / r.images[0]).convert("RGB")] for r in records]


def _weights(path):
    model, _ = load_vlm(path)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_multi_turn_sft_loss_accumulation_and_resume(lab_dir, fresh_model, tmp_path):
    records = read_records(lab_dir / "sft_train.jsonl")
    assert {len(r.prompt) for r in records if r.meta["task"] == "yesno"} == {5}  # three turns each
    model, processor = load_vlm(fresh_model)
    first = [records[i] for i in batch_indices(len(records), 8, 0, 0)]
    with torch.no_grad():
        token_logps, mask = answer_token_logps(model, collate_turns(processor, first, _images(lab_dir, first)))
    expected = float(-(token_logps * mask).sum() / mask.sum())

    one = _sft(lab_dir, fresh_model, tmp_path / "one", 2)
    logged = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(expected, rel=1e-5)
    reference = _weights(one)
    four = _weights(_sft(lab_dir, fresh_model, tmp_path / "four", 2, extra=["optim.grad_accum=4"]))
    _sft(lab_dir, fresh_model, tmp_path / "split", 1)
    resumed = _weights(_sft(lab_dir, fresh_model, tmp_path / "split", 2, resume=True))
    initial = _weights(fresh_model)
    assert max((reference[k] - initial[k]).abs().max() for k in reference) > 1e-4
    for name in reference:
        torch.testing.assert_close(four[name], reference[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-5, atol=1e-6)

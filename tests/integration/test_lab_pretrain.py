"""End to end on a reduced lab: SFT of a saved model (trainable parts, exact resume, multi-turn records), vision
tagging, and the staged, cached CLI recipe."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmalign.cli.main import main
from mmalign.config import load_config
from mmalign.data.collate import collate_sft, collate_turns
from mmalign.data.record_files import read_records
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.lab.world import WorldConfig
from mmalign.models.loading import load_vlm
from mmalign.models.logprobs import answer_token_logps
from mmalign.trainers.common import batch_indices
from mmalign.trainers.sft import SFTConfig, train_sft
from mmalign.trainers.tagging import TaggingConfig, train_tagging

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).parents[2] / "configs" / "lab_pretrain.yaml"

MICRO = {"image_size": 32, "vision_hidden": 32, "vision_layers": 1, "text_hidden": 32, "text_layers": 1, "heads": 2}
SMALL_WORLD = ["lab.world.image_size=32", "lab.world.min_size=8", "lab.world.max_size=14"]


WORLD = WorldConfig(image_size=32, min_size=8, max_size=14)


@pytest.fixture(scope="module")
def lab_dir(tmp_path_factory):
    cfg = LabConfig(out_dir=str(tmp_path_factory.mktemp("lab")), world=WORLD,
                    sizes=SplitSizes(sft=24, pref=4, eval=6, vision=24))
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
                 f"steps={steps}", "batch_size=8", "run.save_every=2", "run.report_to=none", "run.log_every=1",
                 "run.mixed_precision='no'", "optim.schedule=constant", "optim.warmup_ratio=0.0",
                 f"run.resume={str(resume).lower()}", *extra]
    return train_sft(load_config(SFTConfig, overrides=overrides))


def _logits(model, processor, lab_dir):
    records = read_records(lab_dir / "sft_train.jsonl")[:4]
    images = [[Image.open(lab_dir / r.images[0]).convert("RGB")] for r in records]
    batch = collate_sft(processor, records, images)
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_sft_trains_saves_reloads_and_resumes_exactly(lab_dir, fresh_model, tmp_path, dropout):
    extra = [f"image_dropout={dropout}"]
    out = _sft(lab_dir, fresh_model, tmp_path / "full", 4, extra=extra)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and losses[-1] < losses[0]
    model, processor = load_vlm(out)
    again, _ = load_vlm(out)
    reference = _logits(model, processor, lab_dir)
    assert torch.equal(reference, _logits(again, processor, lab_dir))
    # stop after 2 steps, then continue to 4: same weights as the uninterrupted run
    _sft(lab_dir, fresh_model, tmp_path / "split", 2, extra=extra)
    resumed = _sft(lab_dir, fresh_model, tmp_path / "split", 4, resume=True, extra=extra)
    model_b, _ = load_vlm(resumed)
    torch.testing.assert_close(_logits(model_b, processor, lab_dir), reference, rtol=1e-5, atol=1e-5)


def test_image_dropout_changes_training_but_not_with_the_accumulation_split(lab_dir, fresh_model, tmp_path):
    """Hidden examples are drawn per record, so 1 x 8 and 4 x 2 micro-batches train the same weights."""
    model, processor = load_vlm(_sft(lab_dir, fresh_model, tmp_path / "plain", 2))
    one = _sft(lab_dir, fresh_model, tmp_path / "one", 2, extra=["image_dropout=0.5"])
    four = _sft(lab_dir, fresh_model, tmp_path / "four", 2, extra=["image_dropout=0.5", "optim.grad_accum=4"])
    model_one, _ = load_vlm(one)
    model_four, _ = load_vlm(four)
    reference = _logits(model_one, processor, lab_dir)
    torch.testing.assert_close(_logits(model_four, processor, lab_dir), reference, rtol=1e-5, atol=1e-5)
    assert (_logits(model, processor, lab_dir) - reference).abs().max() > 1e-4


def test_multi_turn_sft_loss_accumulation_and_resume(fresh_model, tmp_path):
    """On a lab whose yes/no questions are 3-turn records: the logged loss is the token mean over every answer
    of the global batch, 1 x 8 and 4 x 2 micro-batches train the same weights, a resumed run ends where an
    uninterrupted one does."""
    turns_dir = build_lab(LabConfig(out_dir=str(tmp_path / "lab"), world=WORLD, questions_per_image=3,
                                    sizes=SplitSizes(sft=12, pref=1, eval=1, vision=1), questions_per_turn_record=3))
    records = read_records(turns_dir / "sft_train.jsonl")
    assert {len(r.prompt) for r in records if r.meta["task"] == "yesno"} == {5}  # three turns each
    model, processor = load_vlm(fresh_model)
    first = [records[i] for i in batch_indices(len(records), 8, 0, 0)]
    images = [[Image.open(turns_dir / r.images[0]).convert("RGB")] for r in first]
    with torch.no_grad():
        token_logps, mask = answer_token_logps(model, collate_turns(processor, first, images))
    one = _sft(turns_dir, fresh_model, tmp_path / "one", 2)
    logged = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert logged == pytest.approx(float(-(token_logps * mask).sum() / mask.sum()), rel=1e-5)
    four = _sft(turns_dir, fresh_model, tmp_path / "four", 2, extra=["optim.grad_accum=4"])
    _sft(turns_dir, fresh_model, tmp_path / "split", 1, extra=["run.save_every=1"])
    resumed = _sft(turns_dir, fresh_model, tmp_path / "split", 2, resume=True, extra=["run.save_every=1"])
    assert _changed(fresh_model, one)
    reference = load_file(str(one / "model.safetensors"))
    # accumulation sums the loss in another order: 1.3e-6 apart on the 16-core host of an H200 machine (1e-6 held
    # on the 2-core EPYC); a resumed run repeats the same operations
    for other, atol in ((four, 1e-5), (resumed, 1e-6)):
        for name, value in load_file(str(other / "model.safetensors")).items():
            torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=atol)


def _changed(before: Path, after: Path) -> set[str]:
    a, b = load_file(str(before / "model.safetensors")), load_file(str(after / "model.safetensors"))
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_sft_trains_only_the_named_parts(lab_dir, fresh_model, tmp_path):
    out = _sft(lab_dir, fresh_model, tmp_path / "proj", 2, extra=["trainable=[projector]"])
    changed = _changed(fresh_model, out)
    assert changed and all("multi_modal_projector" in k for k in changed)
    with pytest.raises(ValueError, match="trainable"):
        load_config(SFTConfig, overrides=["trainable=[eyes]"])


def test_tagging_trains_the_vision_side_and_resumes_exactly(lab_dir, fresh_model, tmp_path):
    def tag(out, steps, resume=False):
        return train_tagging(load_config(TaggingConfig, overrides=[
            f"model={fresh_model}", f"data.train={lab_dir / 'vision_train.jsonl'}",
            f"data.eval={lab_dir / 'pref_prompts.jsonl'}", f"run.output_dir={out}", f"steps={steps}",
            "batch_size=8", "run.save_every=2", "run.report_to=none", "run.log_every=1",
            "run.mixed_precision='no'", "optim.warmup_ratio=0", "optim.schedule=constant",
            f"run.resume={str(resume).lower()}"]))

    out = tag(tmp_path / "full", 4)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    changed = _changed(fresh_model, out)
    assert changed and all("vision_tower" in k or "multi_modal_projector" in k for k in changed)
    assert any("vision_tower" in k for k in changed)
    scores = json.loads((out / "tagging_eval.json").read_text())
    assert scores["n"] == 4 and 0.0 <= scores["recall"] <= 1.0 and "token_exact" in scores
    labels = json.loads((out / "tagging_labels.json").read_text())
    assert set(load_file(str(out / "tagging_head.safetensors"))) == {
        "head.weight", "head.bias", "token_head.weight", "token_head.bias"} and len(labels) <= 16
    tag(tmp_path / "split", 2)
    resumed = tag(tmp_path / "split", 4, resume=True)
    assert _changed(out, resumed) == set()


def test_pretrain_cli_runs_the_stages_evaluates_and_caches(tmp_path):
    stages = [f"{s}.steps=2" for s in ("language", "vision", "align", "sft")]
    stages += [f"{s}.batch_size=8" for s in ("language", "vision", "align", "sft")]
    args = ["lab", "pretrain", "--config", str(CONFIG), f"lab.out_dir={tmp_path / 'lab'}",
            f"run.output_dir={tmp_path / 'base'}", "lab.sizes.sft=16", "lab.sizes.pref=2", "lab.sizes.eval=4",
            "lab.sizes.vision=16", *SMALL_WORLD, *stages, "run.save_every=0", "run.report_to=none",
            # one Accelerator config per process: the other in-process runs of the suite use fp32
            "run.mixed_precision='no'", *[f"model.{k}={v}" for k, v in MICRO.items()]]
    assert main(args) == 0
    base = tmp_path / "base"
    for stage in ("init", "language", "vision", "align"):
        assert (base / "stages" / stage / "model.safetensors").is_file(), stage
    trained = {stage: json.loads(line)["step"] for stage in ("language", "vision", "align")
               for line in (base / "stages" / stage / "metrics.jsonl").read_text().splitlines()[-1:]}
    assert trained == {"language": 2, "vision": 2, "align": 2}
    assert _changed(base / "stages" / "align", base)  # the sft stage trained on top of align
    metrics = json.loads((base / "eval" / "metrics.json").read_text())
    for key in ("pope/adversarial/fp_rate", "chair/chair_i_nonpartner", "cooccur/partner_rate",
                "pope_bias/yes_rate_ratio_matched"):
        assert key in metrics["metrics"]
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    assert main(args) == 0
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp  # cached: not retrained

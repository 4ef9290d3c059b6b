"""Offline DPO trainer end to end on tiny VLMs: every family + reload, grad-accumulation invariant, reference
cache == live reference, full fine-tuning, bad input (incl. a processor refusal)."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmalign.config import load_config
from mmalign.data.collate import collate_preference
from mmalign.data.images import open_image
from mmalign.data.record_files import read_records, write_records
from mmalign.data.schema import PreferenceRecord, RecordError
from mmalign.models.logprobs import preference_forward
from mmalign.models.tiny import FAMILIES
from mmalign.trainers.offline import OfflineConfig, train_offline
from transformers import AutoModelForImageTextToText
from transformers.utils import is_torchvision_available

import mmalign.models.lora

pytestmark = pytest.mark.integration

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 220, 20)}


def make_pairs(root: Path, n: int = 16, seed: int = 0) -> Path:
    """``n`` colour questions with one rejected answer each (two for every third record) and their reward margins."""
    rng = random.Random(seed)
    extra = random.Random(seed + 1)  # margins of second rejected answers: the main stream stays as it was
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour = rng.choice(list(COLOURS))
        others = [c for c in COLOURS if c != colour]
        image = Image.new("RGB", (32, 32), COLOURS[colour])
        image.putpixel((i % 32, i // 32), (255, 255, 255))  # every image distinct
        image.save(root / f"images/{i}.png")
        rejected = [f"The image is {others[0]}."] + ([f"It shows a {others[1]} square."] if i % 3 == 0 else [])
        records.append(PreferenceRecord(f"r{i}", [f"images/{i}.png"], "<image>\nWhat colour is the image?",
                                        f"The image is {colour}.", rejected,
                                        meta={"reward_margins": [rng.uniform(-1.0, 3.0)] + [
                                            extra.uniform(-1.0, 3.0) for _ in rejected[1:]]}))
    write_records(root / "pairs.jsonl", records)
    return root / "pairs.jsonl"


def cli_args(model_dir: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    """The test runs' settings as ``key=value`` overrides (later ones win)."""
    return [f"model.path={model_dir}", f"data.train={data}", f"run.output_dir={out}", "batch_size=8",
            "lora.rank=4", "lora.alpha=8", "optim.lr=5e-3", "optim.projector_lr=1e-3", "optim.warmup_ratio=0",
            "run.log_every=1", "run.report_to=none", "max_steps=2", *overrides]


def config(model_dir: Path, data: Path, out: Path, *overrides: str) -> OfflineConfig:
    return load_config(OfflineConfig, None, cli_args(model_dir, data, out, *overrides))


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_weights(a: Path, b: Path, atol: float = 1e-6) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=key)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return make_pairs(tmp_path_factory.mktemp("pairs"))


def reloads_processor(family: str) -> bool:
    """Whether a saved processor of ``family`` loads back here (tiny Qwen processors need torchvision)."""
    return family not in ("qwen2_vl", "qwen2_5_vl") or is_torchvision_available()


@pytest.fixture
def trainable_dir(tiny_vlm, tiny_vlm_dir, tmp_path_factory, monkeypatch):
    """``trainable_dir(family) -> Path`` the trainer can load. Where the saved processor cannot be reloaded
    (Qwen without torchvision) the model alone is saved and the trainer is handed the in-process processor."""

    def get(family: str) -> Path:
        if reloads_processor(family):
            return tiny_vlm_dir(family)
        model, processor = tiny_vlm(family)
        path = tmp_path_factory.mktemp(f"model_only_{family}")
        model.save_pretrained(path)
        monkeypatch.setattr(mmalign.models.lora, "load_vlm", lambda p, **_: (
            AutoModelForImageTextToText.from_pretrained(p).eval(), processor))
        return path

    return get


def _chosen_logps(model, processor, data: Path) -> torch.Tensor:
    records = read_records(data)[:4]
    images = [[open_image(ref, data.parent) for ref in r.images] for r in records]
    with torch.no_grad():
        return preference_forward(model, collate_preference(processor, records, images)).chosen_logps


@pytest.mark.parametrize("family", FAMILIES)
def test_two_steps_per_family_and_reload(family, trainable_dir, tiny_vlm, pairs, tmp_path):
    from peft import PeftModel

    from mmalign.models.loading import load_vlm

    model_dir = trainable_dir(family)
    if not reloads_processor(family):  # the weights reload with plain transformers; the processor is in-process
        processor = tiny_vlm(family)[1]
        load_vlm = lambda p: (AutoModelForImageTextToText.from_pretrained(p).eval(), processor)  # noqa: E731
    out = train_offline(config(model_dir, pairs, tmp_path / "run", "merge_weights=true", "loss.sft_weight=0.5"))
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2]
    # step 1 starts at the reference: DPO loss log 2, rewards 0; the SFT term is the chosen NLL
    assert logged[0]["loss"] == pytest.approx(math.log(2) + 0.5 * logged[0]["sft_nll"], abs=1e-5)
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert logged[1]["rewards/margins"] != 0.0
    base, processor = load_vlm(model_dir)
    merged, _ = load_vlm(out / "merged")
    adapted = PeftModel.from_pretrained(load_vlm(model_dir)[0], out / "adapter").eval()
    base_lp = _chosen_logps(base, processor, pairs)
    merged_lp = _chosen_logps(merged, processor, pairs)
    torch.testing.assert_close(merged_lp, _chosen_logps(adapted, processor, pairs), atol=1e-4, rtol=1e-5)
    assert (merged_lp - base_lp).abs().max() > 1e-4  # training moved the policy
    assert json.loads((out / "data_fingerprint.json").read_text())["n_records"] == 16
    assert (out / "config.yaml").read_text().count("merge_weights: true") == 1


def test_grad_accumulation_invariant_full_finetune(tiny_vlm_dir, pairs, tmp_path):
    """micro-batch 1 x accumulation 8 == micro-batch 8 x accumulation 1: same final parameters."""
    model_dir = tiny_vlm_dir("llava")
    common = ("lora.enabled=false", "optim.lr=1e-3", "loss.sft_weight=0.1", "loss.name=ipo", "loss.beta=0.5")
    acc8 = train_offline(config(model_dir, pairs, tmp_path / "acc8", "optim.grad_accum=8", *common))
    acc1 = train_offline(config(model_dir, pairs, tmp_path / "acc1", "optim.grad_accum=1", *common))
    assert_same_weights(acc8 / "model/model.safetensors", acc1 / "model/model.safetensors", atol=1e-5)
    for a, b in zip(metrics(acc8), metrics(acc1)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    moved = weights(acc1 / "model/model.safetensors")
    base = weights(model_dir / "model.safetensors")
    assert any((moved[k] - base[k]).abs().max() > 1e-4 for k in base if "language_model" in k)
    assert all(torch.equal(moved[k], base[k]) for k in base if "vision_tower" in k)  # frozen by default


def test_sft_only_control_ignores_the_rejected_answers(tiny_vlm_dir, pairs, tmp_path):
    """loss.name=none (the lab's SFT-only control): the loss is the SFT term alone, so other rejected answers
    train the very same weights, while DPO on the same pairs trains others."""
    model_dir = tiny_vlm_dir("llava")
    other = [dataclasses.replace(r, rejected=["No, it is a big purple triangle next to a circle."] * len(r.rejected))
             for r in read_records(pairs)]
    other_pairs = pairs.parent / "other_rejected.jsonl"  # beside the images: paths stay inside the data root
    write_records(other_pairs, other)
    control = ("loss.name=none", "loss.sft_weight=1.0")
    a = train_offline(config(model_dir, pairs, tmp_path / "a", *control))
    b = train_offline(config(model_dir, other_pairs, tmp_path / "b", *control))
    dpo = train_offline(config(model_dir, pairs, tmp_path / "dpo", "loss.sft_weight=1.0"))
    adapter = "adapter/adapter_model.safetensors"
    assert_same_weights(a / adapter, b / adapter, atol=1e-6)
    for m in metrics(a):
        assert m["loss"] == pytest.approx(m["sft_nll"], abs=1e-6)
    assert metrics(a)[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # rewards still reported
    moved = weights(dpo / adapter)
    assert any((moved[k] - v).abs().max() > 1e-5 for k, v in weights(a / adapter).items())


def test_reference_cache_matches_live_reference(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    cache = tmp_path / "refcache"
    extra = ("loss.dynamic_beta=true", "loss.rejected_weights=[0.75,0.25]")
    live = train_offline(config(model_dir, pairs, tmp_path / "live", *extra))
    cached = train_offline(config(model_dir, pairs, tmp_path / "cached", f"ref_cache_dir={cache}", *extra))
    (cache_file,) = cache.glob("*.jsonl")
    n_answers = sum(1 + len(r.rejected) for r in read_records(pairs))
    assert len(cache_file.read_text().splitlines()) == n_answers
    assert_same_weights(live / "adapter/adapter_model.safetensors", cached / "adapter/adapter_model.safetensors")
    again = train_offline(config(model_dir, pairs, tmp_path / "again", f"ref_cache_dir={cache}", *extra))
    assert len(cache_file.read_text().splitlines()) == n_answers  # served from the cache, nothing recomputed
    for a, b in zip(metrics(again), metrics(cached), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_input_is_refused_or_counted(tiny_vlm_dir, pairs, tmp_path):
    model_dir = tiny_vlm_dir("llava")
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    bad = [dict(rows[0], id="no_rejected", rejected=[]), dict(rows[1], id="same", rejected=[rows[1]["chosen"]]),
           dict(rows[2], id="too_long", chosen="red " * 400), dict(rows[3], id="no_margin", meta={})]
    data = _write(pairs.parent / "bad.jsonl", rows[4:] + bad)
    with pytest.raises(RecordError, match="no_rejected.*rejected"):
        train_offline(config(model_dir, data, tmp_path / "a"))
    data = _write(pairs.parent / "bad2.jsonl", rows[4:] + bad[2:])
    with pytest.raises(RecordError, match="too_long.*max_length"):
        train_offline(config(model_dir, data, tmp_path / "b", "data.max_length=200"))
    with pytest.raises(RecordError, match="bad3.jsonl, line 13, record 'no_margin', field 'meta.reward_margins'"):
        train_offline(config(model_dir, _write(pairs.parent / "bad3.jsonl", rows[4:] + bad[3:]), tmp_path / "c",
                             "loss.dynamic_beta=true"))
    skipped = tmp_path / "skipped.jsonl"
    data = _write(pairs.parent / "bad4.jsonl", rows[4:] + bad)
    out = train_offline(config(model_dir, data, tmp_path / "d", "data.max_length=200", "loss.dynamic_beta=true",
                               f"data.skip_invalid_to={skipped}"))
    listed = sorted(json.loads(line)["id"] for line in skipped.read_text().splitlines())
    assert listed == ["no_margin", "no_rejected", "same", "too_long"]
    fingerprint = json.loads((out / "data_fingerprint.json").read_text())
    assert (fingerprint["n_records"], fingerprint["n_skipped"]) == (12, 4)


def test_cli_reports_bad_record_and_config_errors(tiny_vlm_dir, pairs, tmp_path, capsys):
    from mmalign.cli.main import main

    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    data = _write(pairs.parent / "cli_bad.jsonl", rows[1:] + [dict(rows[0], id="lonely", rejected=[])])
    args = ["train", "dpo", *cli_args(tiny_vlm_dir("llava"), data, tmp_path / "cli")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "bad input" in err and "'lonely'" in err and "'rejected'" in err
    assert main(["train", "dpo", *cli_args(tiny_vlm_dir("llava"), pairs, tmp_path / "cli"), "loss.beta=0"]) == 2
    assert "beta > 0" in capsys.readouterr().err


def test_lora_reference_is_the_untouched_base(tiny_vlm_dir, pairs, tmp_path):
    """With the adapter and the projector copy changed, the adapter-disabled policy still equals the base model."""
    from mmalign.models.loading import load_vlm
    from mmalign.models.logprobs import live_reference
    from mmalign.models.lora import prepare_policy

    model_dir = tiny_vlm_dir("llava")
    policy, processor, frozen, projector = prepare_policy(config(model_dir, pairs, tmp_path / "unused"))
    assert frozen is None and projector and all(".modules_to_save." in n for n in projector)
    with torch.no_grad():
        for param in policy.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    records = read_records(pairs)[:4]
    batch = collate_preference(processor, records, [[open_image(r, pairs.parent) for r in x.images] for x in records])
    ref_chosen, ref_rejected = live_reference(policy, None)(batch, [0, 1, 2, 3])
    base = preference_forward(load_vlm(model_dir)[0], batch)
    torch.testing.assert_close(ref_chosen, base.chosen_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_rejected, base.rejected_logps, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert (preference_forward(policy, batch).chosen_logps - base.chosen_logps).abs().max() > 1e-3


def test_processor_refusal_is_a_record_error(trainable_dir, pairs, tmp_path):
    """An image the processor refuses (Qwen2-VL: aspect ratio > 200) names the record; or is skipped."""
    Image.new("RGB", (2000, 8), (200, 10, 10)).save(pairs.parent / "images/wide.png")
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    data = _write(pairs.parent / "wide.jsonl", rows[1:] + [dict(rows[0], id="too_wide", images=["images/wide.png"])])
    model_dir = trainable_dir("qwen2_vl")
    with pytest.raises(RecordError, match="record 'too_wide', field 'images'.*aspect ratio"):
        train_offline(config(model_dir, data, tmp_path / "a"))
    skipped = tmp_path / "skipped.jsonl"
    out = train_offline(config(model_dir, data, tmp_path / "b", "max_steps=1", f"data.skip_invalid_to={skipped}"))
    assert [json.loads(line)["id"] for line in skipped.read_text().splitlines()] == ["too_wide"]
    assert json.loads((out / "data_fingerprint.json").read_text())["n_records"] == 15

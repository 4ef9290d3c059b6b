"""POVID slot inside the offline trainer: one more rejected slot, and the loss is the hand-assembled Apple Eq. 5
weighted mean of the pairwise DPO losses (records' own rejected answers + the POVID answer)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_offline_train import config, make_pairs, trainable_dir  # noqa: F401
from transformers import AutoModelForImageTextToText

from mmalign.data.collate import collate_preference, collate_sft
from mmalign.data.images import open_image
from mmalign.data.record_files import read_records
from mmalign.data.schema import RecordError
from mmalign.models.layouts import PREFERENCE_LAYOUTS, resolve_layout
from mmalign.models.logprobs import live_reference, preference_forward
from mmalign.models.lora import prepare_policy
from mmalign.sampling.povid import noised_image, povid_rejected_logps
from mmalign.trainers.common import make_accelerator
from mmalign.trainers.offline import (
    _collate, _Run, _to_device, micro_loss, policy_and_reference, train_offline,
)
from mmalign.trainers.povid_slot import noise_seed

pytestmark = pytest.mark.integration

BETA, WEIGHTS, POVID_WEIGHT, NOISE = 0.5, (0.75, 0.25), 0.5, 300


def _dpo(pc, pr, rc, rr):
    return -torch.nn.functional.logsigmoid(BETA * ((pc - rc) - (pr - rr)))


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_povid_slot_loss_is_the_eq5_average(family, trainable_dir, tmp_path):  # noqa: F811
    pairs = make_pairs(tmp_path / "pairs", n=6, seed=3)  # r0 and r3 hold two rejected answers
    model_dir = trainable_dir(family)
    cfg = config(model_dir, pairs, tmp_path / "run", "povid.enabled=true", f"povid.noise_steps={NOISE}",
                 f"povid.weight={POVID_WEIGHT}", f"loss.rejected_weights=[{WEIGHTS[0]},{WEIGHTS[1]}]",
                 f"loss.beta={BETA}", "run.seed=7")
    policy, processor, frozen, _ = prepare_policy(cfg)
    cfg = dataclasses.replace(cfg, forward=resolve_layout(cfg.forward, policy, cfg.data.max_length))
    assert cfg.forward == "prefix_cache"  # the default layout on both families
    torch.manual_seed(0)
    with torch.no_grad():  # move the policy off the reference so every pairwise loss differs from log 2
        for param in policy.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))
    records = read_records(pairs)
    idx = list(range(len(records)))
    accelerator = make_accelerator(cfg.run)
    device = accelerator.device  # batches go there (the trainer's prepare moves the models)
    policy.to(device)
    if frozen is not None:
        frozen.to(device)
    reference = live_reference(policy, frozen, PREFERENCE_LAYOUTS[cfg.forward][1])
    run = _Run(cfg, accelerator, policy, policy, frozen, processor, None, None, reference, records, 6)
    batch, povid = _collate(run, idx)
    out, _, ref_rejected = policy_and_reference(run, batch, povid, idx)
    assert out.rejected_mask.shape == ref_rejected.shape == (6, 3)  # K = 2 of the records, + 1 POVID slot
    assert out.rejected_mask[:, 2].all() and out.rejected_mask[:, 1].tolist() == [i % 3 == 0 for i in idx]
    loss, _ = micro_loss(run, batch, povid, idx)

    # by hand: plain forwards of policy and base model, POVID answers from images noised here
    base = AutoModelForImageTextToText.from_pretrained(model_dir).eval().to(device)
    images = [[open_image(ref, pairs.parent) for ref in r.images] for r in records]
    noisy = [[noised_image(im, NOISE, noise_seed(7, r.id, j)) for j, im in enumerate(imgs)]
             for r, imgs in zip(records, images)]
    plain = _to_device(collate_preference(processor, records, images), device)
    clean_sft, noisy_sft = (_to_device(collate_sft(processor, records, imgs), device) for imgs in (images, noisy))
    with torch.no_grad():
        pol, ref = preference_forward(policy, plain), preference_forward(base, plain)
        pol_p = povid_rejected_logps(policy, clean_sft, noisy_sft)
        ref_p = povid_rejected_logps(base, clean_sft, noisy_sft)
    expected, without_povid = [], []
    for i, record in enumerate(records):
        terms = [(w, _dpo(pol.chosen_logps[i], pol.rejected_logps[i, j], ref.chosen_logps[i], ref.rejected_logps[i, j]))
                 for j, w in enumerate(WEIGHTS[: len(record.rejected)])]
        without_povid.append(sum(w * x for w, x in terms) / sum(w for w, _ in terms))
        terms.append((POVID_WEIGHT, _dpo(pol.chosen_logps[i], pol_p[i], ref.chosen_logps[i], ref_p[i])))
        expected.append(sum(w * x for w, x in terms) / sum(w for w, _ in terms))
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)
    assert abs(float(loss) - float(torch.stack(without_povid).mean())) > 1e-3  # the POVID slot counts


def test_povid_refuses_a_record_without_image(trainable_dir, tmp_path):  # noqa: F811
    pairs = make_pairs(tmp_path / "pairs", n=4, seed=3)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows[2] = dict(rows[2], id="text_only", images=[], prompt="What colour is a tomato?")
    data = tmp_path / "pairs/with_text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RecordError, match="record 'text_only', field 'images'.*povid"):
        train_offline(config(trainable_dir("llava"), data, tmp_path / "run", "povid.enabled=true", "batch_size=4"))

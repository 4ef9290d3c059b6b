"""Reward-model forwards (``mmalign.models.reward_forward``): in the shared-prefix and prefix-cache layouts, rewards,
critique log-probs and gradients equal a naive per-answer forward (float64) on every tiny family; critique
token counts by hand; a record with no rejected answer scores its chosen answer."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.data.collate import collate_sft
from mmalign.data.schema import PreferenceRecord
from mmalign.models.heads import ScalarHeadModel, last_token_index
from mmalign.models.logprobs import model_inputs
from mmalign.models.reward_forward import REWARD_LAYOUTS, critique_answers, reward_batch
from mmalign.models.tiny import FAMILIES

RECORDS = [
    PreferenceRecord("a", ["a.png"], "<image>\nDescribe the image.", "There is a red circle.",
                     ["There is a blue square.", "There is a red circle and a green cross, I think."]),
    PreferenceRecord("b", ["b.png"], "<image>\nIs there a red circle in the image?", "Yes.", ["No."]),
]
CRITIQUES = [
    {"chosen": "Right.", "rejected": ["There is no blue square.", "No green cross."]},
    {"chosen": "Yes, it is there.", "rejected": ["Wrong: a red circle is there."]},
]
IMAGES = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (64, 32), (20, 20, 220))]]
SEPARATOR = "\nCritique: "


def _double(batch: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _naive(rm: ScalarHeadModel, processor, records, counts) -> tuple[torch.Tensor, torch.Tensor]:
    """Per answer, alone in its own row with full logits: (rewards [R, S], summed critique log-probs [R, S])."""
    n_slots = max(1 + len(r.rejected) for r in records)
    rewards = torch.zeros(len(records), n_slots, dtype=torch.float64)
    critique = torch.zeros_like(rewards)
    for i, record in enumerate(records):
        for j, answer in enumerate([record.chosen, *record.rejected]):
            row = PreferenceRecord(record.id, record.images, record.prompt, answer, [])
            batch = _double(collate_sft(processor, [row], IMAGES[i : i + 1]))
            out = rm(**model_inputs(batch), use_cache=False)
            last = int(last_token_index(batch["attention_mask"])[0])
            rewards[i, j] = out.scores[0, last]
            logps = out.logits[0, :-1].double().log_softmax(-1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
            n = counts[i][j]
            critique[i, j] = logps[last - n: last].sum() if n else 0.0
    return rewards, critique


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["shared_prefix", "prefix_cache"])
@pytest.mark.parametrize("critique", [False, True])
def test_rewards_critique_logps_and_gradients_match_a_naive_forward(tiny_vlm, family, layout, critique):
    model, processor = tiny_vlm(family, seed=3)
    torch.manual_seed(0)
    rm = ScalarHeadModel(model).double().train()
    records, counts = RECORDS, None
    if critique:
        pairs = [critique_answers(r, c, SEPARATOR, processor.tokenizer) for r, c in zip(RECORDS, CRITIQUES)]
        records, counts = [p[0] for p in pairs], [p[1] for p in pairs]
    if layout == "prefix_cache" and family == "gemma3":  # image blocks: a left-padded cache cannot match
        with pytest.raises(ValueError, match="use forward: shared_prefix"):
            REWARD_LAYOUTS[layout][1](rm, _double(reward_batch(layout, processor, records, IMAGES, 512, counts)))
        return
    weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref_rewards, ref_critique = _naive(rm, processor, records, counts or [[0] * 3] * 2)
    ((weights * ref_rewards).sum() + (weights * ref_critique).sum()).backward()
    ref_grads = _grads(rm)
    rm.zero_grad()

    out = REWARD_LAYOUTS[layout][1](rm, _double(reward_batch(layout, processor, records, IMAGES, 512, counts)))
    ((weights * out.rewards).sum() + (weights * out.critique_logps).sum()).backward()
    assert out.slot_mask.tolist() == [[True, True, True], [True, True, False]]
    torch.testing.assert_close(out.rewards.double(), ref_rewards.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.critique_logps.double(), ref_critique.detach(), atol=1e-5, rtol=1e-5)
    lengths = [counts[0], counts[1] + [0]] if critique else [[0, 0, 0], [0, 0, 0]]
    assert out.critique_lengths.tolist() == lengths
    assert len(set(round(r, 4) for r in out.rewards[0].tolist())) == 3  # the answers are told apart
    grads = _grads(rm)
    assert grads["head.weight"].abs().sum() > 0
    for name in set(grads) | set(ref_grads):  # a parameter no reward reached has no gradient, or a zero one
        grad = grads.get(name, torch.zeros(()))
        ref = ref_grads.get(name, torch.zeros(()))
        assert (grad - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-10, name


def test_plain_layout_matches_the_naive_forward_and_scores_a_lone_chosen_answer(tiny_vlm):
    model, processor = tiny_vlm("llava", seed=3)
    torch.manual_seed(0)
    rm = ScalarHeadModel(model).double().eval()
    lone = [PreferenceRecord("c", ["c.png"], "<image>\nDescribe the image.", "There is a red circle.", [])]
    with torch.no_grad():
        ref, _ = _naive(rm, processor, RECORDS, [[0] * 3] * 2)
        out = REWARD_LAYOUTS["plain"][1](rm, _double(reward_batch("plain", processor, RECORDS, IMAGES, 512)))
        torch.testing.assert_close(out.rewards.double(), ref, atol=1e-6, rtol=1e-6)
        for layout in REWARD_LAYOUTS:
            single = REWARD_LAYOUTS[layout][1](rm, _double(reward_batch(layout, processor, lone, IMAGES[:1], 512)))
            assert single.rewards[0, 0].item() == pytest.approx(ref[0, 0].item(), abs=1e-6)


def test_critique_token_counts_by_hand(tiny_vlm):
    processor = tiny_vlm("llava")[1]
    tok = processor.tokenizer
    record, counts = critique_answers(RECORDS[1], CRITIQUES[1], SEPARATOR, tok)
    assert record.chosen == "Yes.\nCritique: Yes, it is there."
    assert record.rejected == ["No.\nCritique: Wrong: a red circle is there."]
    critiques = ["Yes, it is there.", "Wrong: a red circle is there."]
    for text, critique, n in zip([record.chosen, *record.rejected], critiques, counts):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        tail = tok.decode(ids[len(ids) - (n - 1):])  # n - 1 text tokens + EOS
        assert tail.strip() == critique  # exactly the critique's tokens (the separator is not among them)
    assert counts[0] < counts[1]

"""Shared-prefix forwards (packed block mask; prompt KV cache): same per-answer log-probs and gradients as the
plain concatenated forward (float64) on every tiny family, with LoRA and with full fine-tuning; masks by hand."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.data.collate import collate_preference
from mmalign.data.packing import collate_prefix_cache, collate_shared_prefix
from mmalign.data.schema import PreferenceRecord
from mmalign.models.logprobs import model_inputs
from mmalign.models.tiny import FAMILIES
from mmalign.models.prefix_cache import prefix_cache_forward
from mmalign.models.shared_prefix import block_attention_mask, family_rules, shared_prefix_forward

# Record a has 2 rejected answers, b has 1: exercises rejected_mask and rows of different packed length. The
# long answer (> 64 tokens with its prefix) crosses Gemma3's 64-token sliding window.
LONG = " ".join(["There is a green star and a red circle and a cyan heart."] * 6)
RECORDS = [
    PreferenceRecord("a", ["a.png"], "<image>\nDescribe the image.", "There is a red circle.",
                     ["There is a blue square.", LONG]),
    PreferenceRecord("b", ["b.png"], "<image>\nIs there a red circle in the image?", "Yes.", ["No."]),
]
# Non-square second image: LLaVA-NeXT picks a 2x1 AnyRes grid, Idefics3 splits it into tiles.
IMAGES = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (64, 32), (20, 20, 220))]]


def _naive_plain(model, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain layout, full [N, T, V] logits, log-softmax in the model dtype: (chosen [R], rejected [R, K], mask)."""
    logits = model(**model_inputs(batch), use_cache=False).logits
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    token = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    seq = (token * mask).sum(-1)
    rec, ans = batch["row_record"], batch["row_answer"]
    chosen = seq.new_zeros(int(rec.max()) + 1).index_put((rec[ans == 0],), seq[ans == 0])
    rejected = seq.new_zeros(int(rec.max()) + 1, int(ans.max()))
    rejected = rejected.index_put((rec[ans > 0], ans[ans > 0] - 1), seq[ans > 0])
    return chosen, rejected, mask


def _objective(chosen, rejected, weights) -> torch.Tensor:
    """A weighted sum of every log-prob, so each one's gradient is checked with a distinct weight."""
    return (weights[:, 0] * chosen).sum() + (weights[:, 1:] * rejected).sum()


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=r".*language_model.*\.(q_proj|v_proj|gate_proj)|.*text_model.*\.(q_proj|v_proj)")
    return get_peft_model(model, config)


LAYOUTS = {"packed": (collate_shared_prefix, shared_prefix_forward),
           "cache": (collate_prefix_cache, prefix_cache_forward)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tuning", ["full", "lora"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logps_and_gradients_match_the_plain_forward(tiny_vlm, family, tuning, layout):
    model, processor = tiny_vlm(family, seed=3)
    model = model.double()
    if tuning == "lora":
        model = _lora(model)
    model.train()  # dropout is 0 in the tiny configs; train mode exercises the training code paths
    collate, forward = LAYOUTS[layout]
    plain = collate_preference(processor, RECORDS, IMAGES, max_length=512)
    packed = collate(processor, RECORDS, IMAGES, max_length=512)
    plain = {k: v.double() if v.is_floating_point() else v for k, v in plain.items()}
    packed = {k: v.double() if v.is_floating_point() else v for k, v in packed.items()}
    weights = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    ref_chosen, ref_rejected, _ = _naive_plain(model, plain)
    _objective(ref_chosen, ref_rejected, weights).backward()
    ref_grads = _grads(model)
    model.zero_grad()
    if layout == "cache" and family == "gemma3":  # sliding windows + image blocks: a left-padded cache can't match
        with pytest.raises(ValueError, match="use forward: shared_prefix"):
            forward(model, packed)
        return
    out = forward(model, packed)
    (_objective(out.chosen_logps, out.rejected_logps, weights)).backward()
    grads = _grads(model)

    torch.testing.assert_close(out.chosen_logps, ref_chosen, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.rejected_logps, ref_rejected, atol=1e-9, rtol=1e-9)
    assert out.rejected_mask.tolist() == [[True, True], [True, False]]
    assert set(grads) == set(ref_grads) and len(grads) > 0
    # transformers' RMSNorm layers compute in float32 even in a float64 model, so gradients are float32-exact
    # only: summing a prefix's gradient once (packed) or once per answer (plain) differs at float32 rounding.
    for name, grad in grads.items():
        scale = ref_grads[name].abs().max()
        assert (grad - ref_grads[name]).abs().max() <= 1e-6 * scale + 1e-12, name
    # the first image (record a) must matter: a vision tower that the packed path skipped would give zero grads
    if tuning == "full":
        assert any(("vision" in n or "visual" in n) and g.abs().sum() > 0 for n, g in grads.items())


# Two images in one prompt, text between them, beside a one-image record: image tokens of several images per
# row, and (Qwen mRoPE) answer positions after the second image's grid.
MULTI_RECORDS = [
    PreferenceRecord("m", ["x.png", "y.png"], "<image>\nCompare it with <image>\nWhat changed?",
                     "The circle turned blue.", ["Nothing changed.", "The square turned red."]),
    RECORDS[1],
]
MULTI_IMAGES = [[Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (20, 20, 220))], IMAGES[1]]


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "gemma3"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_multi_image_records_match_the_plain_forward(tiny_vlm, family, layout):
    model, processor = tiny_vlm(family, seed=3)
    model = model.double().eval()
    collate, forward = LAYOUTS[layout]
    plain = collate_preference(processor, MULTI_RECORDS, MULTI_IMAGES, max_length=512)
    shared = collate(processor, MULTI_RECORDS, MULTI_IMAGES, max_length=512)
    plain = {k: v.double() if v.is_floating_point() else v for k, v in plain.items()}
    shared = {k: v.double() if v.is_floating_point() else v for k, v in shared.items()}
    with torch.no_grad():
        ref_chosen, ref_rejected, _ = _naive_plain(model, plain)
        out = forward(model, shared)
    torch.testing.assert_close(out.chosen_logps, ref_chosen, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out.rejected_logps, ref_rejected, atol=1e-9, rtol=1e-9)
    assert out.rejected_mask.tolist() == [[True, True], [True, False]]

def test_packed_row_layout_and_lengths(tiny_vlm):
    model, processor = tiny_vlm("llava")
    packed = collate_shared_prefix(processor, RECORDS, IMAGES)
    plain = collate_preference(processor, RECORDS, IMAGES)
    tok = processor.tokenizer
    lengths = [[len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in (r.chosen, *r.rejected)]
               for r in RECORDS]
    prefix = [int(n) - lengths[r][0] for r, n in zip(range(2), plain["attention_mask"][[0, 3]].sum(-1))]
    assert (packed["segment_ids"] == 0).sum(-1).tolist() == prefix
    assert packed["attention_mask"].sum(-1).tolist() == [prefix[r] + sum(lengths[r]) for r in range(2)]
    # every answer starts at order P
    seg, order = packed["segment_ids"][0], packed["order_ids"][0]
    for s in (1, 2, 3):
        assert order[seg == s].tolist() == list(range(prefix[0], prefix[0] + lengths[0][s - 1]))
    # the image is in the packed batch once per record, in the plain batch once per answer
    assert packed["pixel_values"].shape[0] == 2 and plain["pixel_values"].shape[0] == 5
    with torch.no_grad():
        out = shared_prefix_forward(model, packed)
    assert out.chosen_lengths.tolist() == [lengths[0][0], lengths[1][0]]
    assert out.rejected_lengths.tolist() == [lengths[0][1:], [lengths[1][1], 0]]
    assert out.chosen_mask.sum().item() == lengths[0][0] + lengths[1][0]


def test_block_mask_by_hand():
    # prefix of 2, answer 1 (2 tokens), answer 2 (1 token), one pad
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    order = torch.tensor([[0, 1, 2, 3, 2, 0]])
    keep = block_attention_mask(seg, order)[0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 0, 0, 0, 1],  # padding: never read; sees itself (and order-0 prefix)
    ], dtype=torch.bool)
    assert torch.equal(keep, expected)
    # window 2 over orders: answer-2 token (order 2) sees order 1 and itself only
    keep = block_attention_mask(seg, order, window=2)[0, 0]
    assert keep[4].tolist() == [False, True, False, False, True, False]
    # an image block (tokens 0-1) attends bidirectionally inside itself
    blocks = torch.tensor([[0, 0, -1, -1, -1, -1]])
    keep = block_attention_mask(seg, order, image_blocks=blocks)[0, 0]
    assert keep[0].tolist() == [True, True, False, False, False, False]


def test_unsupported_settings_are_refused(tiny_vlm):
    model, _ = tiny_vlm("llava")
    model.config.model_type = "paligemma"
    with pytest.raises(ValueError, match="not supported"):
        family_rules(model.config)
    model, _ = tiny_vlm("llava")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="dense mask"):
        family_rules(model.config)


def test_too_long_virtual_row_is_refused_with_the_record_id(tiny_vlm):
    _, processor = tiny_vlm("llava")
    from mmalign.data.collate import SequenceTooLong

    # the limit is per virtual row [prefix | answer], as in the plain layout: the packed row may be longer
    plain = collate_preference(processor, RECORDS[1:], IMAGES[1:])
    width = plain["input_ids"].shape[1]
    packed = collate_shared_prefix(processor, RECORDS[1:], IMAGES[1:], max_length=width)
    assert packed["input_ids"].shape[1] > width
    with pytest.raises(SequenceTooLong, match="record 'b'"):
        collate_shared_prefix(processor, RECORDS[1:], IMAGES[1:], max_length=width - 1)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_eager_attention_takes_the_additive_mask(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    model.set_attn_implementation("eager")
    plain = collate_preference(processor, RECORDS, IMAGES)
    packed = collate_shared_prefix(processor, RECORDS, IMAGES)
    with torch.no_grad():
        chosen, rejected, _ = _naive_plain(model, plain)
        out = shared_prefix_forward(model, packed)
    # eager attention takes its softmax in float32 whatever the layout: float32 tolerance
    torch.testing.assert_close(out.chosen_logps, chosen, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.rejected_logps, rejected, atol=1e-4, rtol=1e-5)

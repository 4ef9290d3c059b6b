"""Image-attention masking in generate (Eq. 6): rho = 0 is plain generation, full masking removes the image,
partial masking keeps the unmasked position ids (checked against a naive full-recompute decoding loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.collate import encode_prompts
from mmalign.models.image_tokens import image_token_mask
from mmalign.sampling.masked import MaskedRow, encode_rows, generate_masked, hide_image_tokens, image_token_counts

FAMILIES = ["llava", "llava_next", "idefics3", "gemma3"]
PROMPTS = ["<image>\nDescribe the image.", "<image>\nIs there a red circle in the image? Answer briefly."]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = [[_image(1, (64, 32))], [_image(2, (32, 32))]]
OTHER_IMAGES = [[_image(3, (64, 32))], [_image(4, (32, 32))]]


def _rows(model, processor, images, keep_value, prefix=""):
    counts = image_token_counts(model, processor, PROMPTS, images)
    return [MaskedRow(p, imgs, prefix, np.full(n, keep_value), 0) for p, imgs, n in zip(PROMPTS, images, counts)]


@pytest.mark.parametrize("family", FAMILIES)
def test_rho_zero_reproduces_plain_generate_token_for_token(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    inputs = encode_prompts(processor, PROMPTS, IMAGES)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    plain = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    masked = generate_masked(model, processor, _rows(model, processor, IMAGES, True), max_new_tokens=12,
                             temperature=0.0, stop_at_sentence_end=False)
    assert masked == plain
    assert all(len(t) > 0 for t in masked)


def _first_step_logits(model, processor, rows):
    inputs, _ = encode_rows(processor, rows)
    positions = model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    inputs["attention_mask"] = hide_image_tokens(model.config, inputs["input_ids"], inputs["attention_mask"],
                                                 [r.keep for r in rows])
    with torch.no_grad():
        return model(**inputs, position_ids=positions).logits[:, -1]


@pytest.mark.parametrize("family", FAMILIES)
def test_masking_every_image_token_makes_output_independent_of_the_image(tiny_vlm, image_sensitive, family):
    model, processor = tiny_vlm(family)
    model = image_sensitive(model)
    visible = [_first_step_logits(model, processor, _rows(model, processor, imgs, True, "There is"))
               for imgs in (IMAGES, OTHER_IMAGES)]
    hidden = [_first_step_logits(model, processor, _rows(model, processor, imgs, False, "There is"))
              for imgs in (IMAGES, OTHER_IMAGES)]
    assert (visible[0] - visible[1]).abs().max() > 1e-3  # the image matters when visible
    torch.testing.assert_close(hidden[0], hidden[1], rtol=0, atol=1e-6)
    texts = [generate_masked(model, processor, _rows(model, processor, imgs, False, "There is"), max_new_tokens=8,
                             temperature=0.0, stop_at_sentence_end=False) for imgs in (IMAGES, OTHER_IMAGES)]
    assert texts[0] == texts[1]


def _naive_masked_greedy(model, processor, prompt, images, keep, n_tokens):
    """Reference: no cache, full forward each step, attention 0 at hidden image tokens, positions 0..T-1."""
    inputs = dict(encode_prompts(processor, [prompt], [images]))
    ids = inputs.pop("input_ids")
    inputs.pop("attention_mask")
    image_positions = torch.nonzero(ids[0] == model.config.image_token_id).squeeze(-1)
    new = []
    for _ in range(n_tokens):
        attention = torch.ones_like(ids)
        attention[0, image_positions[torch.from_numpy(~keep)]] = 0
        positions = torch.arange(ids.shape[1])[None]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, **inputs).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token == processor.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return processor.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_partial_mask_keeps_unmasked_positions(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    counts = image_token_counts(model, processor, PROMPTS, IMAGES)
    keeps = [np.random.default_rng(i).random(n) >= 0.5 for i, n in enumerate(counts)]
    assert all(0 < k.sum() < len(k) for k in keeps)
    rows = [MaskedRow(p, imgs, "", k, 0) for p, imgs, k in zip(PROMPTS, IMAGES, keeps)]
    fast = generate_masked(model, processor, rows, max_new_tokens=8, temperature=0.0, stop_at_sentence_end=False)
    naive = [_naive_masked_greedy(model, processor, p, imgs, k, 8) for p, imgs, k in zip(PROMPTS, IMAGES, keeps)]
    assert fast == naive
    # Positions derived from the holed mask (what generate does without explicit ids) change the answer.
    inputs, _ = encode_rows(processor, rows[:1])
    holed = hide_image_tokens(model.config, inputs["input_ids"], inputs["attention_mask"], keeps[:1])
    with torch.no_grad():
        right = model(**(inputs | {"attention_mask": holed}), position_ids=torch.arange(holed.shape[1])[None]).logits
        shifted = model(**(inputs | {"attention_mask": holed}), position_ids=(holed.cumsum(-1) - 1).clamp_min(0)).logits
    assert (right[0, -1] - shifted[0, -1]).abs().max() > 1e-4


def test_hide_image_tokens_zeroes_exactly_the_hidden_image_positions(tiny_vlm):
    model, processor = tiny_vlm("llava")
    rows = _rows(model, processor, IMAGES, True)
    inputs, _ = encode_rows(processor, rows)
    keeps = [np.arange(len(r.keep)) % 3 == 0 for r in rows]
    masked = hide_image_tokens(model.config, inputs["input_ids"], inputs["attention_mask"], keeps)
    image = image_token_mask(model.config, inputs["input_ids"])
    for b, keep in enumerate(keeps):
        assert masked[b][image[b]].tolist() == keep.astype(int).tolist()
        assert torch.equal(masked[b][~image[b]], inputs["attention_mask"][b][~image[b]])
    with pytest.raises(ValueError, match="row 0: 16 image tokens in the input but a mask over 3"):
        hide_image_tokens(model.config, inputs["input_ids"], inputs["attention_mask"], [np.ones(3, bool), keeps[1]])


def test_prefix_is_continued_and_period_stops(tiny_vlm):
    model, processor = tiny_vlm("llava")
    rows = _rows(model, processor, IMAGES, True, prefix="There is a red")
    free = generate_masked(model, processor, rows, max_new_tokens=12, temperature=0.0, stop_at_sentence_end=False)
    inputs, lengths = encode_rows(processor, rows)
    prefix_ids = processor.tokenizer("There is a red", add_special_tokens=False)["input_ids"]
    assert lengths == [len(prefix_ids)] * 2
    assert inputs["input_ids"][0, -len(prefix_ids):].tolist() == prefix_ids
    # Swap the output rows of '.' and of the greedy token after the prefix: '.' then comes first and ends the row.
    best = int(_first_step_logits(model, processor, rows[:1])[0].argmax())
    dot = processor.tokenizer.convert_tokens_to_ids(".")
    assert best != dot
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[[best, dot]] = head[[dot, best]]
    stopped = generate_masked(model, processor, rows[:1], max_new_tokens=12, temperature=0.0, stop_at_sentence_end=True)
    assert stopped == ["."]
    assert len(free[0]) > 1

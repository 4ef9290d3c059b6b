"""Image-attention masking on Qwen2-VL / Qwen2.5-VL, whose position ids are 3-D mRoPE (t, h, w) ids.

transformers 5 builds the Qwen-VL processors only with torchvision (their video half); this file uses a small
stand-in with the image half only (chat template, ``Qwen2VLImageProcessorPil``, one ``<|image_pad|>`` per
merged patch, ``mm_token_type_ids`` 1 on image tokens), which is what the models consume for images.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.collate import encode_prompts
from mmalign.models.tiny import build_tiny_model, qwen_image_processor
from mmalign.sampling.masked import MaskedRow, encode_rows, generate_masked, hide_image_tokens, image_token_counts

IMAGE_PAD = "<|image_pad|>"
PROMPTS = ["<image>\nDescribe the image.", "<image>\nIs there a red circle in the image? Answer briefly."]


class QwenImageProcessorStandIn:
    """The image half of ``Qwen2VLProcessor``: expands each image pad to grid_t * grid_h * grid_w / merge^2."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.image_processor = qwen_image_processor()

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(messages, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images, text, padding=True, padding_side="left", return_tensors="pt"):
        pixels = self.image_processor(images=[im for imgs in images for im in imgs], return_tensors="pt")
        merge = self.image_processor.merge_size ** 2
        counts = iter(int(grid.prod()) // merge for grid in pixels["image_grid_thw"])
        expanded = []
        for t in text:
            pieces = t.split(IMAGE_PAD)
            expanded.append(pieces[0] + "".join(IMAGE_PAD * next(counts) + p for p in pieces[1:]))
        encoded = self.tokenizer(expanded, padding=padding, padding_side=padding_side, return_tensors=return_tensors)
        image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        return {**encoded, "mm_token_type_ids": (encoded["input_ids"] == image_id).long(),
                "pixel_values": pixels["pixel_values"], "image_grid_thw": pixels["image_grid_thw"]}


def _image(seed, size):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


IMAGES = [[_image(1, (64, 32))], [_image(2, (32, 32))]]
OTHER_IMAGES = [[_image(3, (64, 32))], [_image(4, (32, 32))]]


@pytest.fixture(params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request):
    model, tokenizer = build_tiny_model(request.param)
    return model, QwenImageProcessorStandIn(tokenizer)


def _rows(model, processor, images, keeps, prefix=""):
    return [MaskedRow(p, imgs, prefix, k, 0) for p, imgs, k in zip(PROMPTS, images, keeps)]


def test_rho_zero_reproduces_plain_generate(qwen):
    model, processor = qwen
    counts = image_token_counts(model, processor, PROMPTS, IMAGES)
    assert counts == [8, 4]
    inputs = encode_prompts(processor, PROMPTS, IMAGES)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id)
    plain = processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    rows = _rows(model, processor, IMAGES, [np.ones(n, bool) for n in counts])
    masked = generate_masked(model, processor, rows, max_new_tokens=10, temperature=0.0, stop_at_sentence_end=False)
    assert masked == plain


def _logits(model, processor, rows, positions):
    inputs, _ = encode_rows(processor, rows)
    inputs["attention_mask"] = hide_image_tokens(model.config, inputs["input_ids"], inputs["attention_mask"],
                                                 [r.keep for r in rows])
    with torch.no_grad():
        return model(**inputs, position_ids=positions(inputs)).logits[:, -1]


def test_partial_mask_uses_the_unmasked_mrope_positions_and_full_mask_drops_the_image(qwen):
    model, processor = qwen
    counts = image_token_counts(model, processor, PROMPTS, IMAGES)
    keeps = [np.arange(n) % 2 == 0 for n in counts]
    rows = _rows(model, processor, IMAGES, keeps, "There is")
    inputs, _ = encode_rows(processor, rows)

    def rope_index(batch):  # 3-D ids from the unmasked mask, computed by the model's own rule
        ids, _ = model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                            image_grid_thw=batch["image_grid_thw"],
                                            attention_mask=inputs["attention_mask"])
        return ids

    used = model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    assert used.shape == (4, 2, inputs["input_ids"].shape[1])
    assert torch.equal(used[1:], rope_index(inputs))
    # The answer the generation path gives equals one forward with those positions; it is not the image-free one.
    first = generate_masked(model, processor, rows, max_new_tokens=1, temperature=0.0, stop_at_sentence_end=False)
    logits = _logits(model, processor, rows, rope_index)
    tokens = [processor.tokenizer.decode([int(t)]) for t in logits.argmax(-1)]
    assert first == tokens

    def shifted(batch):  # every token after a hidden image token moved back by the holes before it (the trap)
        holes = (inputs["attention_mask"] - batch["attention_mask"]).cumsum(-1)
        return rope_index(batch) - holes[None]

    assert (_logits(model, processor, rows, shifted) - logits).abs().max() > 1e-4
    hidden = [_logits(model, processor, _rows(model, processor, imgs, [np.zeros(n, bool) for n in counts]),
                      lambda b: None) for imgs in (IMAGES, OTHER_IMAGES)]
    visible = [_logits(model, processor, _rows(model, processor, imgs, [np.ones(n, bool) for n in counts]),
                       lambda b: None) for imgs in (IMAGES, OTHER_IMAGES)]
    assert (visible[0] - visible[1]).abs().max() > 1e-4
    torch.testing.assert_close(hidden[0], hidden[1], rtol=0, atol=1e-6)

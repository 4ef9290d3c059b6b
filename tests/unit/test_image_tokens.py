"""image_token_mask marks exactly the positions whose embeddings the model overwrites with image features."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.data.chat import render_prompt
from mmalign.models.image_tokens import image_token_id, image_token_mask
from mmalign.models.tiny import build_tiny_model, qwen_image_processor

# A non-square image: LLaVA-NeXT picks a 2-tile grid, Idefics3 splits it, Qwen gets a non-square patch grid.
IMAGE = Image.new("RGB", (64, 32), (200, 30, 30))


def substituted_positions(model, inputs) -> torch.Tensor:
    """bool[B, T]: where the embeddings entering the language model differ from the token embeddings, i.e. the
    positions the model actually filled with image features (computed from the model's own forward)."""
    captured = {}

    def grab(module, args, kwargs):
        captured["embeds"] = kwargs["inputs_embeds"].detach()

    handle = model.get_decoder().register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    text_embeds = model.get_input_embeddings()(inputs["input_ids"])
    return (captured["embeds"] != text_embeds).any(-1)


@pytest.mark.parametrize("family,expected,placeholder", [
    ("llava", 16, "<image>"),  # 4x4 patches, CLS dropped
    ("llava_next", 16 + 2 * 16 + 4, "<image>"),  # base tile + 1x2 tiles (4x8 grid) + one newline per row
    ("idefics3", 3 * 4, "<image>"),  # 2 split tiles + global tile, 4 tokens each after pixel shuffle
    ("gemma3", 4, "<image_soft_token>"),  # 4x4 patches average-pooled to 2x2; BOI/EOI are text
])
def test_mask_equals_substituted_positions(tiny_vlm, family, expected, placeholder):
    model, processor = tiny_vlm(family)
    text = render_prompt(processor, "<image>\nIs there a red circle in the image?", 1)
    inputs = processor(text=[text], images=[[IMAGE]], return_tensors="pt")
    mask = image_token_mask(model.config, inputs["input_ids"])
    assert int(mask.sum()) == expected
    assert torch.equal(mask, substituted_positions(model, inputs))
    tokens = processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][0][mask[0]])
    assert set(tokens) == {placeholder}


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_mask_equals_substituted_positions(family):
    """Qwen processors need torchvision; expand the placeholders by hand as Qwen2VLProcessor does."""
    model, tokenizer = build_tiny_model(family)
    pixels = qwen_image_processor()(images=[IMAGE], return_tensors="pt")
    n_tokens = int(pixels["image_grid_thw"].prod()) // 4
    assert n_tokens == 8  # 64x32 px -> 8x4 patches -> 4x2 after the 2x2 merge
    text = f"<|im_start|>user\n<|vision_start|>{'<|image_pad|>' * n_tokens}<|vision_end|>Describe.<|im_end|>\n"
    inputs = dict(tokenizer([text], return_tensors="pt"), **pixels)
    # What the processor returns beside input_ids: 1 marks image placeholders for the mRoPE index.
    inputs["mm_token_type_ids"] = (inputs["input_ids"] == tokenizer.convert_tokens_to_ids("<|image_pad|>")).long()
    mask = image_token_mask(model.config, inputs["input_ids"])
    assert int(mask.sum()) == n_tokens
    assert torch.equal(mask, substituted_positions(model, inputs))


def test_mask_batch_with_left_padding(tiny_vlm):
    model, processor = tiny_vlm("gemma3")
    texts = [render_prompt(processor, p, 1) for p in ["<image>\nDescribe the image.", "<image>\nHi"]]
    inputs = processor(text=texts, images=[[IMAGE], [IMAGE]], padding=True, padding_side="left",
                       return_tensors="pt")
    mask = image_token_mask(model.config, inputs["input_ids"])
    assert mask.sum(-1).tolist() == [4, 4]
    assert torch.equal(mask, substituted_positions(model, inputs))
    # The shorter prompt is padded on the left, so its image run starts later.
    starts = mask.int().argmax(-1)
    assert int(starts[1] - starts[0]) == int((inputs["attention_mask"][1] == 0).sum())


def test_image_token_id_per_config_field():
    model, tokenizer = build_tiny_model("idefics3")
    assert image_token_id(model.config) == tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_id(model.config) != tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    model, tokenizer = build_tiny_model("gemma3")
    assert image_token_id(model.config) == tokenizer.convert_tokens_to_ids("<image_soft_token>")


def test_unknown_architecture_and_bad_shape_are_errors():
    model, _ = build_tiny_model("llava")
    with pytest.raises(ValueError, match="must be \\[B, T\\]"):
        image_token_mask(model.config, torch.zeros(5, dtype=torch.long))
    text_config = model.config.text_config
    with pytest.raises(ValueError, match="no image-token rule for model_type 'llama'"):
        image_token_id(text_config)


@pytest.mark.parametrize("family,per_image", [("llava", 16), ("idefics3", 12), ("gemma3", 4)])
def test_two_images_in_one_prompt(tiny_vlm, family, per_image):
    model, processor = tiny_vlm(family)
    text = render_prompt(processor, "<image>\nLeft image. <image>\nRight image. Same shapes?", 2)
    inputs = processor(text=[text], images=[[IMAGE, IMAGE.rotate(90)]], return_tensors="pt")
    mask = image_token_mask(model.config, inputs["input_ids"])
    assert int(mask.sum()) == 2 * per_image
    assert torch.equal(mask, substituted_positions(model, inputs))

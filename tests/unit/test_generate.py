"""generate(): batching with left padding is invisible, seeds reproduce, stop-at-period and prefixes work."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.models.tiny import FAMILIES
from mmalign.data.collate import encode_prompts
from mmalign.sampling.generate import GenerationParams, generate

IMAGES = [Image.new("RGB", (64, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 200, 0)),
          Image.new("RGB", (40, 64), (0, 0, 255))]
# Prompt lengths differ by several tokens, so the batch is left-padded.
PROMPTS = ["<image>\nDescribe the image.", "<image>\nIs there a red circle in the image?",
           "<image>\nWhat is shown in the picture? Answer the question with a single word."]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_equals_each_prompt_alone(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    params = GenerationParams(max_new_tokens=10)
    batched = generate(model, processor, PROMPTS, [[im] for im in IMAGES], params)
    alone = [generate(model, processor, [p], [[im]], params)[0] for p, im in zip(PROMPTS, IMAGES)]
    assert batched == alone
    assert len({a for a in batched if a}) >= 2  # real, input-dependent text (a random model may emit EOS first)


def test_sampling_is_reproducible_for_a_seed_and_leaves_global_rng(tiny_vlm):
    model, processor = tiny_vlm("llava")
    params = GenerationParams(max_new_tokens=12, temperature=1.0)
    images = [[im] for im in IMAGES]
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate(model, processor, PROMPTS, images, params, seed=7)
    assert torch.equal(torch.rand(1), before)  # caller's RNG stream untouched
    assert generate(model, processor, PROMPTS, images, params, seed=7) == first
    assert generate(model, processor, PROMPTS, images, params, seed=8) != first
    greedy = generate(model, processor, PROMPTS, images, GenerationParams(max_new_tokens=12))
    assert greedy != first


def _model_that_says_period_early(tiny_vlm):
    """Greedy-decoding model whose third answer token is '.', followed by more text: the '.' row of the output
    head is a slightly scaled copy of the row of the token greedy decoding would pick there."""
    model, processor = tiny_vlm("llava")
    tokenizer = processor.tokenizer
    inputs = encode_prompts(processor, PROMPTS[:1], [[IMAGES[0]]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    third = int(out[0, -1])
    dot = tokenizer.convert_tokens_to_ids(".")
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[dot] = 1.05 * head[third]
    return model, processor


def test_stop_at_period_truncates_after_first_period(tiny_vlm):
    model, processor = _model_that_says_period_early(tiny_vlm)
    full = generate(model, processor, PROMPTS[:1], [[IMAGES[0]]], GenerationParams(max_new_tokens=12))[0]
    stopped = generate(model, processor, PROMPTS[:1], [[IMAGES[0]]],
                       GenerationParams(max_new_tokens=12, stop_at_period=True))[0]
    assert "." in full and full.index(".") < len(full) - 1  # text goes on after the first period
    assert stopped == full[: full.index(".") + 1]


def test_continue_from_extends_the_given_prefix(tiny_vlm):
    """The answer continues (rendered prompt + prefix tokens): parity with model.generate on those ids."""
    model, processor = tiny_vlm("gemma3")
    tokenizer = processor.tokenizer
    images = [[IMAGES[0]], [IMAGES[1]]]
    prefixes = ["There is a red", "Yes"]
    params = GenerationParams(max_new_tokens=6)
    answers = generate(model, processor, PROMPTS[:2], images, params, continue_from=prefixes)
    for i, prefix in enumerate(prefixes):
        prompt = encode_prompts(processor, PROMPTS[i:i + 1], images[i:i + 1])
        prefix_ids = torch.tensor([tokenizer(prefix, add_special_tokens=False)["input_ids"]])
        joined = encode_prompts(processor, PROMPTS[i:i + 1], images[i:i + 1], [prefix])
        assert torch.equal(joined["input_ids"], torch.cat([prompt["input_ids"], prefix_ids], 1))
        with torch.no_grad():
            out = model.generate(**joined, max_new_tokens=6, do_sample=False)
        expected = tokenizer.decode(out[0, joined["input_ids"].shape[1]:], skip_special_tokens=True).rstrip()
        assert answers[i] == expected
    # An empty prefix is plain generation.
    plain = generate(model, processor, PROMPTS[:2], images, params)
    empty = generate(model, processor, PROMPTS[:2], images, params, continue_from=["", ""])
    assert [e.strip() for e in empty] == plain
    assert [a.strip() for a in answers] != plain


def test_bad_input_is_a_clear_error(tiny_vlm):
    model, processor = tiny_vlm("llava")
    with pytest.raises(ValueError, match="2 prompts but 1 image lists"):
        generate(model, processor, PROMPTS[:2], [[IMAGES[0]]], GenerationParams())
    with pytest.raises(ValueError, match="1 continue_from"):
        generate(model, processor, PROMPTS[:2], [[IMAGES[0]]] * 2, GenerationParams(), continue_from=["a"])
    with pytest.raises(ValueError, match="must not mix records with and without images"):
        generate(model, processor, ["Hi", PROMPTS[0]], [[], [IMAGES[0]]], GenerationParams())
    with pytest.raises(ValueError, match="top_p"):
        GenerationParams(top_p=0.0)

"""Per family: build -> save -> load_vlm -> a preference record through the processor -> forward, backward, generate."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from mmalign.config import ConfigError
from mmalign.data.chat import answer_ids, render_prompt
from mmalign.models.image_tokens import image_token_mask
from mmalign.models.loading import (
    freeze_vision_tower,
    load_vlm,
    projector_param_names,
    vision_param_names,
)
from mmalign.models.tiny import FAMILIES, build_tiny_model, build_tiny_vlm
from mmalign.sampling.generate import GenerationParams, generate

pytestmark = pytest.mark.integration

RECORD = {"id": "r1", "prompt": "<image>\nIs there a red circle in the image?", "chosen": "Yes.",
          "rejected": ["No."]}
IMAGE = Image.new("RGB", (64, 32), (220, 20, 20))


def _record_inputs(processor):
    text = render_prompt(processor, RECORD["prompt"], 1)
    prompt = processor(text=[text], images=[[IMAGE]], return_tensors="pt")
    chosen = torch.tensor([answer_ids(processor.tokenizer, RECORD["chosen"])])
    inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], chosen], 1),
                  attention_mask=torch.cat([prompt["attention_mask"], torch.ones_like(chosen)], 1))
    for key in ("token_type_ids", "mm_token_type_ids"):  # Gemma3 / Qwen: answer tokens are text (0)
        if key in prompt:
            inputs[key] = torch.cat([prompt[key], torch.zeros_like(chosen)], 1)
    return text, prompt["input_ids"].shape[1], inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_family_forward_backward_generate(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    text, n_prompt, inputs = _record_inputs(processor)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], len(processor.tokenizer))

    # The image matters: another image changes the answer logits.
    other = processor(text=[text], images=[[Image.new("RGB", (64, 32), (20, 20, 220))]], return_tensors="pt")
    with torch.no_grad():
        other_logits = model(**dict(inputs, **{k: v for k, v in other.items() if "pixel" in k})).logits
    assert (other_logits[0, n_prompt:] - logits[0, n_prompt:]).abs().max() > 1e-4

    mask = image_token_mask(model.config, inputs["input_ids"])
    assert mask[0, n_prompt:].sum() == 0 and mask[0, :n_prompt].sum() > 0

    # Teacher-forced answer NLL backpropagates into the projector and the language model.
    model.train()
    labels = inputs["input_ids"].clone()
    labels[:, :n_prompt] = -100
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    grads = dict(model.named_parameters())
    assert torch.isfinite(loss) and loss.item() > 0
    assert all(grads[n].grad is not None and grads[n].grad.abs().sum() > 0 for n in projector_param_names(model))

    answers = generate(model.eval(), processor, [RECORD["prompt"]], [[IMAGE]], GenerationParams(max_new_tokens=5))
    assert len(answers[0]) > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip(tiny_vlm, tiny_vlm_dir, family):
    model, processor = tiny_vlm(family)
    loaded, loaded_processor = load_vlm(tiny_vlm_dir(family))
    # a tiny Qwen processor (image half only) reloads as the full Qwen-VL processor, its parent class
    assert type(loaded) is type(model) and isinstance(processor, type(loaded_processor))
    _, _, inputs = _record_inputs(loaded_processor)
    # Reloaded weights and processor reproduce the original logits and answers exactly.
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
    params = GenerationParams(max_new_tokens=5)
    answers = generate(loaded, loaded_processor, [RECORD["prompt"]], [[IMAGE]], params)
    assert answers == generate(model, processor, [RECORD["prompt"]], [[IMAGE]], params)


@pytest.mark.parametrize("family", FAMILIES)
def test_build_is_seeded_and_tiny(family):
    # how fast a build is belongs to benchmarks/, not to a test on a shared machine
    model, _ = build_tiny_model(family, seed=3)
    again, _ = build_tiny_model(family, seed=3)
    other, _ = build_tiny_model(family, seed=4)
    weights = lambda m: torch.cat([p.flatten() for p in m.parameters()])  # noqa: E731
    assert torch.equal(weights(model), weights(again))
    assert not torch.equal(weights(model), weights(other))
    assert sum(p.numel() for p in model.parameters()) < 400_000


@pytest.mark.parametrize("family", FAMILIES)
def test_vision_and_projector_params_partition(family):
    model, _ = build_tiny_model(family)
    vision, projector = set(vision_param_names(model)), set(projector_param_names(model))
    assert vision and projector and not vision & projector
    language = {n for n, _ in model.named_parameters()} - vision - projector
    assert all(("language_model" in n or "text_model" in n or n.startswith("lm_head")) for n in language)
    assert freeze_vision_tower(model) == len(vision)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == projector | language


def test_load_vlm_dtype_and_errors(tiny_vlm_dir, tmp_path):
    model, processor = load_vlm(tiny_vlm_dir("llava"), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    # generate() casts pixel inputs to the model's dtype.
    assert len(generate(model, processor, [RECORD["prompt"]], [[IMAGE]], GenerationParams(max_new_tokens=3))) == 1
    with pytest.raises(ConfigError, match="no such directory"):
        load_vlm(tmp_path / "missing")
    with pytest.raises(ConfigError, match="no config.json"):
        load_vlm(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' is not an image-text-to-text"):
        load_vlm(tmp_path)
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        load_vlm(tiny_vlm_dir("llava"), dtype="fp8")


def test_unknown_family_is_an_error():
    with pytest.raises(ValueError, match="unknown tiny VLM family 'blip'"):
        build_tiny_vlm("blip")

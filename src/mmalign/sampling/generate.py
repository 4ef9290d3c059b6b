"""Batched, image-conditioned generation with explicit decoding parameters and seed.

Prompts are record prompts (text with ``<image>`` markers or chat messages) rendered with the processor's
chat template, left-padded so every row's answer starts at the same column, and decoded with
``model.generate``. An optional assistant prefix per item (``continue_from``) is appended after the rendered
prompt so the model continues a given partial answer; BDHS (arXiv 2502.01419, Eq. 7) uses this with
``stop_at_period`` to "finish the sentence" from a pivot inside the reference answer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from PIL import Image
from transformers import GenerationConfig

from mmalign.data.collate import encode_prompts
from mmalign.models.image_tokens import image_token_id
from mmalign.models.prefix_cache import prefix_cache_refusal
from mmalign.models.shared_prefix import family_rules

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings. ``temperature == 0`` means greedy; otherwise multinomial sampling with nucleus ``top_p``.

    ``stop_at_period``: each answer ends at its first ``'.'`` (kept), or at EOS / ``max_new_tokens``.
    ``stop``: strings that end an answer where the first of them appears (not kept; OpenAI's ``stop``).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop_at_period: bool = False
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")


def _generation_config(model: Any, params: GenerationParams) -> GenerationConfig:
    """The model's own config (ids, EOS) with every sampling knob set explicitly, so checkpoints' defaults
    (e.g. a shipped ``do_sample=True, top_k=20``) never change what ``params`` asks for."""
    config = GenerationConfig.from_dict(model.generation_config.to_dict())
    config.max_new_tokens = params.max_new_tokens
    config.do_sample = params.temperature > 0
    config.temperature = params.temperature if config.do_sample else None
    config.top_p = params.top_p if config.do_sample else None
    config.top_k = None
    stops = [*params.stop, *(["."] if params.stop_at_period else [])]
    config.stop_strings = stops or None
    return config


def _check_lengths(prompts: list, images: list, continue_from: list[str] | None) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    if continue_from is not None and len(continue_from) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(continue_from)} continue_from prefixes")


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first of the ``stop`` strings (excluded), and whether one was found."""
    found = [text.index(s) for s in stop if s in text]
    return (text[:min(found)], True) if found else (text, False)


def _finish(text: str, params: GenerationParams, continuing: bool) -> str:
    if params.stop_at_period and "." in text:
        text = text[: text.index(".") + 1]
    text = cut_at_stop(text, params.stop)[0]
    # A continuation keeps its leading space so that prefix + continuation is the full answer.
    return text.rstrip() if continuing else text.strip()


def _generated(model: Any, processor: Any, prompts: list, images: list[list[Image.Image]], params: GenerationParams,
               seed: int, batch_size: int, continue_from: list[str] | None, suppress: list[int] | None = None,
               copies: int = 1, streamer: Any = None) -> Iterator[torch.Tensor]:
    """The new tokens long[B, T_new] of each ``model.generate`` call, in order (seeded as ``generate`` says);
    ``suppress``: token ids never sampled; ``copies``: answers per prompt (consecutive rows), ``batch_size``
    counting rows; ``streamer``: passed to ``model.generate``."""
    _check_lengths(prompts, images, continue_from)
    config = _generation_config(model, params)
    config.suppress_tokens = suppress
    per_call = max(1, batch_size // copies)
    devices = [model.device] if model.device.type != "cpu" else []
    with torch.random.fork_rng(devices=devices, device_type=model.device.type), torch.no_grad():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), per_call):
            stop = start + per_call
            prefixes = continue_from[start:stop] if continue_from is not None else None
            inputs = _encode(model, processor, prompts[start:stop], images[start:stop], prefixes)
            width = inputs["input_ids"].shape[1]
            if copies > 1 and _prefill_is_exact(model, width + params.max_new_tokens):
                inputs = _shared_prefill(model, inputs, copies)
            elif copies > 1:  # each copy encoded and prefilled on its own row
                inputs = _encode(model, processor, [p for p in prompts[start:stop] for _ in range(copies)],
                                 [i for i in images[start:stop] for _ in range(copies)], None)
            output = model.generate(**inputs, generation_config=config, tokenizer=processor.tokenizer,
                                    streamer=streamer)
            yield output[:, width:]


def _encode(model: Any, processor: Any, prompts: list, images: list, prefixes: list[str] | None) -> Any:
    return encode_prompts(processor, prompts, images, prefixes).to(model.device).to(dtype=model.dtype)


def _prefill_is_exact(model: Any, total_length: int) -> bool:
    """Whether a prompt's KV cache can be computed once and decoded from k times with the model's own positions
    and masks (as ``models.prefix_cache`` checks; mRoPE positions need the image inputs at every call)."""
    core = extract_model_from_parallel(model)
    return prefix_cache_refusal(core, total_length) is None and not family_rules(core.config).mrope


def _shared_prefill(model: Any, inputs: Any, copies: int) -> dict[str, Any]:
    """Run the left-padded prompts (with their images) once, all but their last token, into a KV cache repeated
    ``copies`` times per prompt; ``generate`` then feeds only the last prompt token of each row."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # what generate derives for left-padded rows
    head = dict(inputs) | {"input_ids": ids[:, :-1], "attention_mask": mask[:, :-1]}
    cache = model(**head, position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
    rows = torch.arange(len(ids), device=ids.device).repeat_interleave(copies)
    cache.reorder_cache(rows)
    return {"input_ids": ids[rows], "attention_mask": mask[rows], "past_key_values": cache}


def generate(
    model: Any,
    processor: Any,
    prompts: list[str | list[dict]],
    images: list[list[Image.Image]],
    params: GenerationParams,
    seed: int = 0,
    batch_size: int = 16,
    continue_from: list[str] | None = None,
    streamer: Any = None,
) -> list[str]:
    """Generate one answer per prompt.

    Args:
        model, processor: a VLM and its processor (``load_vlm`` / ``build_tiny_vlm``); inputs go to
            ``model.device`` and floating inputs to ``model.dtype``.
        prompts: record prompts; ``images[i]`` holds the PIL images of prompt ``i`` (its ``<image>`` markers).
        params: decoding settings.
        seed: torch is seeded with it before the first batch (caller's RNG state restored afterwards), so the
            same inputs, ``seed`` and ``batch_size`` give the same answers.
        batch_size: prompts per ``model.generate`` call.
        continue_from: optional assistant-prefix text per item; the answer returned is then only the
            continuation, such that ``continue_from[i] + answer[i]`` is the full answer.
        streamer: a transformers streamer (``put`` gets the prompt ids, then each new token) for one prompt.
    Returns:
        decoded answers without prompt, prefix or special tokens.
    """
    if streamer is not None and len(prompts) != 1:
        raise ValueError(f"a streamer follows one prompt, got {len(prompts)}")
    answers: list[str] = []
    for new_tokens in _generated(model, processor, prompts, images, params, seed, batch_size, continue_from,
                                 streamer=streamer):
        texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        answers += [_finish(t, params, continue_from is not None) for t in texts]
    logger.debug("generated %d answers (seed %d, %s)", len(answers), seed, params)
    return answers


def generate_ids(model: Any, processor: Any, prompts: list[str | list[dict]], images: list[list[Image.Image]],
                 params: GenerationParams, seed: int = 0, batch_size: int = 16, copies: int = 1) -> list[list[int]]:
    """The generated token ids of each answer, up to and including its first EOS (all of them when the token
    budget ran out first): exactly what the policy sampled, for RL log-probs (re-tokenising decoded text need
    not give the same tokens). The image placeholder token is never sampled: fed back into the model it would
    claim image features that do not exist (TRL issue #3847).

    ``copies`` answers per prompt (rows ``i * copies .. i * copies + copies - 1``; ``batch_size`` counts rows):
    where exact for the model (``_prefill_is_exact``), each prompt with its images is encoded once and its KV
    cache decoded ``copies`` times; the answers equal those of the prompt list repeated ``copies`` times."""
    if params.stop_at_period:
        raise ValueError("generate_ids returns whole answers; stop_at_period applies to text (use generate)")
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    answers = []
    suppress = [image_token_id(model.config)]
    for new_tokens in _generated(model, processor, prompts, images, params, seed, batch_size, None, suppress, copies):
        for row in new_tokens.tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
            answers.append(row[:end])
    return answers

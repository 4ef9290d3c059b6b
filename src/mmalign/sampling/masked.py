"""Generation with image tokens hidden from attention (Eq. 6) after an assistant prefix (Eq. 7).

Amirloo et al. 2024 (arXiv 2407.02477), Sec. 3.4.1: each image token i of the LLM input gets m_i in {0, 1};
tokens with m_i = 0 are removed from the attention mask, so no text token attends to them in any layer
and at any decoding step. Position ids stay those of the unmasked sequence: ``generate`` would otherwise
derive them from the holed mask (cumsum) and shift every later token (lab notes). They are computed by the
model's own ``_prepare_position_ids_for_generation`` fed the unmasked mask, which is what ``generate`` runs
for an unmasked input, so every family (incl. the 3-D mRoPE ids of Qwen2-VL) gets its native positions.

Rows are independent: greedy decoding (temperature 0) or Gumbel-max sampling from a per-row generator, so a
row's text does not depend on the other rows of its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from transformers import (
    GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList,
)

from mmalign.data.collate import encode_prompts
from mmalign.models.image_tokens import image_token_mask
from mmalign.sampling.sentences import closes_sentence, first_sentence, sentence_ends


@dataclass
class MaskedRow:
    """One generation request: a record prompt with its images, an assistant ``prefix`` the answer continues,
    ``keep`` bool[n_image_tokens] (False = hidden from attention) and the row's sampling ``seed``."""

    prompt: str | list[dict]
    images: list[Image.Image]
    prefix: str
    keep: np.ndarray
    seed: int


def _left_pad(rows: list[Tensor], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, width - len(row):] = row
    return out


def encode_rows(processor: Any, rows: Sequence[MaskedRow]) -> tuple[dict[str, Tensor], list[int]]:
    """Processor outputs of the rows with each prefix appended after its prompt, left-padded.

    The prefix is tokenized apart (as ``answer_ids`` tokenizes answers in training). Per-token processor
    outputs (``token_type_ids``, ``mm_token_type_ids``) get zeros on prefix tokens. Returns the inputs
    (``input_ids`` / ``attention_mask`` [B, T] + image tensors) and each row's prefix token ids length.
    """
    encoded = encode_prompts(processor, [r.prompt for r in rows], [r.images for r in rows])
    input_ids, attention = encoded["input_ids"], encoded["attention_mask"].bool()
    per_token = [k for k, v in encoded.items() if k not in ("input_ids", "attention_mask")
                 and isinstance(v, Tensor) and v.shape == input_ids.shape]
    tokenizer = processor.tokenizer
    seqs, extras, prefix_lengths = [], {k: [] for k in per_token}, []
    for i, row in enumerate(rows):
        prefix = tokenizer(row.prefix, add_special_tokens=False)["input_ids"] if row.prefix else []
        prefix_lengths.append(len(prefix))
        seqs.append(torch.cat([input_ids[i][attention[i]], torch.tensor(prefix, dtype=input_ids.dtype)]))
        for key in per_token:
            tail = torch.zeros(len(prefix), dtype=encoded[key].dtype)
            extras[key].append(torch.cat([encoded[key][i][attention[i]], tail]))
    out = {k: v for k, v in encoded.items() if k not in per_token and k not in ("input_ids", "attention_mask")}
    out["input_ids"] = _left_pad(seqs, tokenizer.pad_token_id)
    out["attention_mask"] = _left_pad([torch.ones_like(s) for s in seqs], 0)
    for key in per_token:
        out[key] = _left_pad(extras[key], 0)
    return out, prefix_lengths


def hide_image_tokens(config: Any, input_ids: Tensor, attention_mask: Tensor, keeps: Sequence[np.ndarray]) -> Tensor:
    """Eq. 6: ``attention_mask`` [B, T] with 0 at the image tokens whose ``keeps[b]`` entry is False.

    ``keeps[b]`` is bool[n_b] over row b's image tokens in sequence order; its length must equal the row's
    image-token count (``image_token_mask``).
    """
    image_mask = image_token_mask(config, input_ids)
    masked = attention_mask.clone()
    for b, keep in enumerate(keeps):
        positions = torch.nonzero(image_mask[b]).squeeze(-1)
        if len(positions) != len(keep):
            raise ValueError(f"row {b}: {len(positions)} image tokens in the input but a mask over {len(keep)}")
        masked[b, positions[torch.from_numpy(~np.asarray(keep, dtype=bool))]] = 0
    return masked


def hide_image_attention(model: Any, inputs: dict[str, Tensor], keeps: Sequence[np.ndarray]) -> dict[str, Tensor]:
    """``inputs`` with Eq. 6 holes in ``attention_mask`` and explicit ``position_ids`` of the unmasked sequence.

    The positions are what the model's own ``_prepare_position_ids_for_generation`` derives from the unmasked
    mask (2-D, or [4, B, T] text + mRoPE for Qwen2-VL), so hiding a token never shifts a later one. Used by
    masked generation and by SFT with ``image_dropout``.
    """
    out = dict(inputs)
    out["position_ids"] = model._prepare_position_ids_for_generation(inputs["input_ids"], dict(inputs))
    out["attention_mask"] = hide_image_tokens(model.config, inputs["input_ids"], inputs["attention_mask"], keeps)
    return out


def image_token_counts(model: Any, processor: Any, prompts: Sequence[Any], images: Sequence[list[Image.Image]]) -> list[int]:
    """Number of image tokens each prompt expands to (what a mask of Eq. 6 ranges over)."""
    encoded = encode_prompts(processor, prompts, images)
    return [int(n) for n in image_token_mask(model.config, encoded["input_ids"]).sum(dim=-1)]


class _GumbelRows(LogitsProcessor):
    """Per-row sampling at ``temperature`` as an argmax: logits / T + Gumbel noise from the row's own generator
    (Gumbel-max trick), so a row's draws do not depend on its batch."""

    def __init__(self, seeds: Sequence[int], temperature: float):
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        vocab = scores.shape[-1]
        uniform = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-300)))
        return scores.float() / self.temperature + gumbel.to(scores.device, torch.float32)


class _StopAtSentenceEnd(StoppingCriteria):
    """Row done once its new text (after column ``width``) holds a certain sentence end (Eq. 7: y2 is decoded to
    the end of its sentence; ``sentences.closes_sentence``: a full stop followed by more text, so "3." that may
    become "3.5" does not stop it). Costs one token past the stop; the text is cut there (``first_sentence``)."""

    def __init__(self, tokenizer: Any, width: int):
        self.tokenizer, self.width = tokenizer, width

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)
        return torch.tensor([closes_sentence(t) for t in texts], device=input_ids.device)


def _continuation(tokenizer: Any, prefix_ids: Tensor, new_ids: Tensor, stop_at_sentence_end: bool) -> str:
    """Text the new tokens add after the prefix, cut after the sentence it finishes when stopping there.

    Decoded together with the prefix and then stripped of the prefix's own decoding, so tokenizers whose
    decoder joins words with spaces (word-level) still give the space between prefix and continuation.
    """
    head = tokenizer.decode(prefix_ids, skip_special_tokens=True)
    full = tokenizer.decode(torch.cat([prefix_ids, new_ids]), skip_special_tokens=True)
    common = 0
    while common < min(len(head), len(full)) and head[common] == full[common]:
        common += 1
    text = full[common:]
    return first_sentence(text) if stop_at_sentence_end else text


@dataclass(frozen=True)
class Continuation:
    """One row's generated text, and whether it stopped only because it reached ``max_new_tokens`` (no EOS and,
    when stopping at sentence ends, no sentence end): a truncation the caller must report, not hide."""

    text: str
    truncated: bool


@torch.no_grad()
def generate_masked_rows(model: Any, processor: Any, rows: Sequence[MaskedRow], *, max_new_tokens: int,
                         temperature: float, stop_at_sentence_end: bool) -> list[Continuation]:
    """Continue each row's prefix under its image-attention mask; returns each continuation (no prefix).

    One batched ``generate`` call: inputs [B, T] with holes at hidden image tokens, explicit position ids of
    the unmasked sequence, greedy when ``temperature == 0`` else per-row Gumbel-max sampling. Inputs go to the
    model's device.
    """
    inputs, prefix_lengths = encode_rows(processor, rows)
    inputs = {k: v.to(model.device, model.dtype) if v.is_floating_point() else v.to(model.device)
              for k, v in inputs.items()}
    inputs = hide_image_attention(model, inputs, [r.keep for r in rows])
    tokenizer = processor.tokenizer
    width = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([_GumbelRows([r.seed for r in rows], temperature)] if temperature > 0 else [])
    stopping = StoppingCriteriaList([_StopAtSentenceEnd(tokenizer, width)] if stop_at_sentence_end else [])
    # Only the ids come from the checkpoint: its own decoding defaults (sampling, penalties) must not change BDHS.
    eos = model.generation_config.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=eos, bos_token_id=model.generation_config.bos_token_id)
    out = model.generate(**inputs, generation_config=config,
                         logits_processor=processors, stopping_criteria=stopping)
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
    results = []
    for b, n_prefix in enumerate(prefix_lengths):
        prefix_ids = inputs["input_ids"][b, width - n_prefix:].cpu() if n_prefix else torch.zeros(0, dtype=torch.long)
        new_ids = out[b, width:].cpu()
        text = _continuation(tokenizer, prefix_ids, new_ids, stop_at_sentence_end)
        ended = bool(torch.isin(new_ids, eos_ids).any()) or (
            stop_at_sentence_end and bool(sentence_ends(text, at_start=False)))
        results.append(Continuation(text, truncated=not ended))
    return results


def generate_masked(model: Any, processor: Any, rows: Sequence[MaskedRow], *, max_new_tokens: int,
                    temperature: float, stop_at_sentence_end: bool) -> list[str]:
    """The texts of ``generate_masked_rows``."""
    return [c.text for c in generate_masked_rows(model, processor, rows, max_new_tokens=max_new_tokens,
                                                 temperature=temperature, stop_at_sentence_end=stop_at_sentence_end)]

"""Processor-aware collation: records + images -> model-ready tensors with exact answer labels.

Prompts (with their images) go through the model's own processor, so image tokens are expanded exactly as
the model expects (LLaVA, LLaVA-NeXT AnyRes tiles, Qwen2-VL grids, Idefics3 splits, Gemma3). Answers are
tokenized apart (``answer_ids``) and appended to the unpadded prompt, then rows are right-padded: with right
padding every real token keeps the position it has when the row is run alone, which makes a batch's
per-row log-probs independent of what else is in the batch (the gradient-accumulation invariant depends on
it). A row longer than ``max_length`` is refused with the record id: image tokens are never truncated.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from mmalign.data.chat import answer_ids, render_prompt

IGNORE_INDEX = -100


class SequenceTooLong(ValueError):
    """A prompt + answer longer than the configured maximum; truncating could cut image tokens."""


def encode_prompts(
    processor: Any,
    prompts: Sequence[Any],
    images: Sequence[Sequence[Image.Image]],
    continue_from: Sequence[str] | None = None,
) -> Any:
    """Render and process a batch of prompts with their images, left-padded.

    ``continue_from`` optionally appends an assistant-prefix text to each rendered prompt (generation then
    continues it). Returns the processor's ``BatchFeature``: ``input_ids`` / ``attention_mask`` of shape [B, T]
    plus the family's image tensors (``pixel_values``, ``image_sizes``, ``image_grid_thw``,
    ``pixel_attention_mask``, ``token_type_ids``, ...).
    """
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    if continue_from is not None and len(continue_from) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(continue_from)} continue_from prefixes")
    texts = [render_prompt(processor, p, len(imgs)) for p, imgs in zip(prompts, images)]
    if continue_from is not None:
        texts = [text + prefix for text, prefix in zip(texts, continue_from)]
    has_images = any(len(imgs) for imgs in images)
    if has_images and not all(len(imgs) for imgs in images):
        raise ValueError("a batch must not mix records with and without images")
    return processor(
        images=[list(imgs) for imgs in images] if has_images else None,
        text=texts,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )


def append_answers(
    encoded: dict[str, torch.Tensor],
    answers: Sequence[list[int]],
    pad_id: int,
    max_length: int | None,
    row_ids: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Append answer ids to each unpadded prompt row and right-pad; labels cover answers only.

    Per-token processor outputs (any tensor shaped like ``input_ids``, e.g. Gemma3 ``token_type_ids``) are
    re-laid out the same way, with zeros on answer tokens.
    """
    input_ids, attention = encoded["input_ids"], encoded["attention_mask"].bool()
    per_token = [k for k, v in encoded.items() if k not in ("input_ids", "attention_mask")
                 and isinstance(v, torch.Tensor) and v.shape == input_ids.shape]
    rows, labels, extras = [], [], {k: [] for k in per_token}
    for i, answer in enumerate(answers):
        prompt = input_ids[i][attention[i]]
        seq = torch.cat([prompt, torch.tensor(answer, dtype=input_ids.dtype)])
        if max_length is not None and len(seq) > max_length:
            raise SequenceTooLong(
                f"record {row_ids[i]!r}: prompt ({len(prompt)} tokens incl. image tokens) + answer "
                f"({len(answer)} tokens) = {len(seq)} > max_length {max_length}; raise max_length or drop the record"
            )
        rows.append(seq)
        labels.append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), seq[len(prompt):]]))
        for key in per_token:
            tail = torch.zeros(len(answer), dtype=encoded[key].dtype)
            extras[key].append(torch.cat([encoded[key][i][attention[i]], tail]))
    width = max(len(r) for r in rows)
    out = {k: v for k, v in encoded.items() if k not in per_token and k not in ("input_ids", "attention_mask")}
    out["input_ids"] = right_pad(rows, width, pad_id)
    out["attention_mask"] = right_pad([torch.ones_like(r) for r in rows], width, 0)
    out["labels"] = right_pad(labels, width, IGNORE_INDEX)
    for key in per_token:
        out[key] = right_pad(extras[key], width, 0)
    return out


def right_pad(rows: list[torch.Tensor], width: int, value: int) -> torch.Tensor:
    """Stack 1-D rows into [len(rows), width], filling the tail of each row with ``value``."""
    out = torch.full((len(rows), width), value, dtype=rows[0].dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate_sft(processor: Any, records: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                max_length: int | None = None) -> dict[str, torch.Tensor]:
    """SFT batch: prompt + ``record.chosen`` per row; ``labels`` [B, T] are -100 except on answer tokens."""
    encoded = encode_prompts(processor, [r.prompt for r in records], images)
    tokenizer = processor.tokenizer
    answers = [answer_ids(tokenizer, r.chosen) for r in records]
    return append_answers(encoded, answers, tokenizer.pad_token_id, max_length, [r.id for r in records])


def collate_preference(processor: Any, records: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                       max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Plain concatenated preference batch: one row per (record, answer), chosen first, then each rejected.

    With R records holding K_r rejected answers there are N = sum_r (1 + K_r) rows, each carrying the
    record's prompt and images again (the reference layout; the shared-prefix path encodes them once).
    Adds ``row_record`` [N] (record index of each row) and ``row_answer`` [N] (0 = chosen, j = j-th rejected).
    """
    prompts, row_images, answers, row_ids, row_record, row_answer = [], [], [], [], [], []
    tokenizer = processor.tokenizer
    for r_idx, (record, imgs) in enumerate(zip(records, images)):
        for a_idx, text in enumerate([record.chosen, *record.rejected]):
            prompts.append(record.prompt)
            row_images.append(imgs)
            answers.append(answer_ids(tokenizer, text))
            row_ids.append(record.id)
            row_record.append(r_idx)
            row_answer.append(a_idx)
    encoded = encode_prompts(processor, prompts, row_images)
    out = append_answers(encoded, answers, tokenizer.pad_token_id, max_length, row_ids)
    out["row_record"] = torch.tensor(row_record)
    out["row_answer"] = torch.tensor(row_answer)
    return out

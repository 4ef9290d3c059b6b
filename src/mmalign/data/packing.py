"""Shared-prefix collation: one packed row per record, [prefix | chosen | rejected_1 | ... | rejected_K].

The plain layout (``collate.collate_preference``) repeats a record's image and prompt once per answer; here
the prompt (with its image tokens) appears once and every answer follows it in the same row. Each token
carries its segment (which answer it belongs to) and its *order*: its position in the virtual plain row
[prefix | that answer], so answer j's first token has order P (the prefix length) whatever precedes it in the
packed row. ``mmalign.models.shared_prefix`` turns segments and orders into the block attention mask and the
position ids that make every answer see exactly what it sees in the plain layout.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image

from mmalign.data.chat import answer_ids
from mmalign.data.collate import IGNORE_INDEX, SequenceTooLong, encode_prompts, right_pad

PAD_SEGMENT = -1
PREFIX_SEGMENT = 0
CHOSEN_SEGMENT = 1  # rejected answer j (1-based) has segment 1 + j


def pack_answers(encoded: dict[str, torch.Tensor], answers: Sequence[Sequence[list[int]]], pad_id: int,
                 max_length: int | None, record_ids: Sequence[str]) -> dict[str, torch.Tensor]:
    """Pack each record's unpadded prompt and all its answers into one right-padded row.

    encoded: ``encode_prompts`` output for R records (left-padded [R, T_p] prompts + image tensors, one entry
    per record). answers: per record, the token ids of the chosen answer then each rejected answer.
    Returns the image tensors unchanged plus, with L = the longest packed row:
    ``input_ids`` [R, L]; ``attention_mask`` [R, L] (1 on real tokens; the forward replaces it with the block
    mask); ``labels`` [R, L] (-100 except on answer tokens); ``segment_ids`` [R, L] (-1 padding, 0 prefix,
    1 chosen, 1 + j rejected j); ``order_ids`` [R, L] (position in the virtual row [prefix | answer]);
    per-token processor outputs (e.g. Gemma3 ``token_type_ids``) re-laid out with zeros on answer tokens.
    ``max_length`` bounds each virtual row (prefix + one answer), as in the plain layout.
    """
    input_ids, attention = encoded["input_ids"], encoded["attention_mask"].bool()
    per_token = [k for k, v in encoded.items() if k not in ("input_ids", "attention_mask")
                 and isinstance(v, torch.Tensor) and v.shape == input_ids.shape]
    columns: dict[str, list[torch.Tensor]] = {k: [] for k in ("input_ids", "labels", "segment_ids", "order_ids",
                                                              *per_token)}
    for r, record_answers in enumerate(answers):
        prompt = input_ids[r][attention[r]]
        n_prompt = len(prompt)
        longest = max(len(a) for a in record_answers)
        if max_length is not None and n_prompt + longest > max_length:
            raise SequenceTooLong(
                f"record {record_ids[r]!r}: prompt ({n_prompt} tokens incl. image tokens) + answer ({longest} "
                f"tokens) = {n_prompt + longest} > max_length {max_length}; raise max_length or drop the record"
            )
        tails = [torch.tensor(a, dtype=input_ids.dtype) for a in record_answers]
        columns["input_ids"].append(torch.cat([prompt, *tails]))
        columns["labels"].append(torch.cat([torch.full_like(prompt, IGNORE_INDEX), *tails]))
        columns["segment_ids"].append(torch.cat(
            [torch.full((n_prompt,), PREFIX_SEGMENT)]
            + [torch.full((len(t),), CHOSEN_SEGMENT + j) for j, t in enumerate(tails)]))
        columns["order_ids"].append(torch.cat(
            [torch.arange(n_prompt)] + [torch.arange(n_prompt, n_prompt + len(t)) for t in tails]))
        for key in per_token:
            zeros = torch.zeros(sum(len(t) for t in tails), dtype=encoded[key].dtype)
            columns[key].append(torch.cat([encoded[key][r][attention[r]], zeros]))
    width = max(len(row) for row in columns["input_ids"])
    pads = {"input_ids": pad_id, "labels": IGNORE_INDEX, "segment_ids": PAD_SEGMENT, "order_ids": 0}
    out = {k: v for k, v in encoded.items() if k not in per_token and k not in ("input_ids", "attention_mask")}
    for key, rows in columns.items():
        out[key] = right_pad(rows, width, pads.get(key, 0))
    out["attention_mask"] = (out["segment_ids"] != PAD_SEGMENT).long()
    return out


def collate_shared_prefix(processor: Any, records: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                          max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Shared-prefix preference batch of R records: the processor sees each prompt and image once.

    Same records and answers as ``collate_preference``; rows as in ``pack_answers``. Records may differ in how
    many rejected answers they hold (none: the chosen answer alone, for scoring; the preference forward needs
    at least one).
    """
    encoded = encode_prompts(processor, [r.prompt for r in records], images)
    tokenizer = processor.tokenizer
    answers = [[answer_ids(tokenizer, a) for a in (r.chosen, *r.rejected)] for r in records]
    return pack_answers(encoded, answers, tokenizer.pad_token_id, max_length, [r.id for r in records])


def collate_prefix_cache(processor: Any, records: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                         max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Prefix-cache preference batch: R left-padded prompts (with images) and N = sum_r (1 + K_r) answer rows.

    Returns the ``encode_prompts`` entries for the prompts ([R, T_p], image tensors) plus ``answer_ids`` /
    ``answer_mask`` [N, A] (right-padded answer tokens incl. EOS), ``answer_record`` [N] (record index) and
    ``answer_slot`` [N] (0 = chosen, j = j-th rejected). ``max_length`` bounds prompt + answer, as in the plain
    layout.
    """
    encoded = encode_prompts(processor, [r.prompt for r in records], images)
    tokenizer = processor.tokenizer
    prompt_lengths = encoded["attention_mask"].sum(dim=1).tolist()
    rows, row_record, row_slot = [], [], []
    for r, record in enumerate(records):
        answers = [record.chosen, *record.rejected]
        for slot, text in enumerate(answers):
            ids = answer_ids(tokenizer, text)
            if max_length is not None and prompt_lengths[r] + len(ids) > max_length:
                raise SequenceTooLong(
                    f"record {record.id!r}: prompt ({prompt_lengths[r]} tokens incl. image tokens) + answer "
                    f"({len(ids)} tokens) > max_length {max_length}; raise max_length or drop the record")
            rows.append(torch.tensor(ids, dtype=encoded["input_ids"].dtype))
            row_record.append(r)
            row_slot.append(slot)
    width = max(len(row) for row in rows)
    encoded["answer_ids"] = right_pad(rows, width, tokenizer.pad_token_id)
    encoded["answer_mask"] = right_pad([torch.ones_like(row) for row in rows], width, 0)
    encoded["answer_record"] = torch.tensor(row_record)
    encoded["answer_slot"] = torch.tensor(row_slot)
    return encoded

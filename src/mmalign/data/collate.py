"""Processor-aware collation: records + images -> model-ready tensors with exact answer labels.

Prompts (with their images) go through the model's own processor, so image tokens are expanded exactly as
the model expects (LLaVA, LLaVA-NeXT AnyRes tiles, Qwen2-VL grids, Idefics3 splits, Gemma3). Answers are
tokenized apart (``answer_ids``) and appended to the unpadded prompt, then rows are right-padded: with right
padding every real token keeps the position it has when the row is run alone, which makes a batch's
per-row log-probs independent of what else is in the batch (the gradient-accumulation invariant depends on
it). A row longer than ``max_length`` is refused with the record id: image tokens are never truncated.
``collate_sft`` labels ``chosen`` alone (the row a preference record's chosen answer has: earlier assistant
turns of a message prompt are context); ``collate_turns`` (the SFT trainer's) labels every assistant answer
of the conversation in one row.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch
from PIL import Image

from mmalign.data.chat import answer_ids, conversation_pieces, earlier_answers, render_prompt

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
    return _process(processor, texts, images)


def _process(processor: Any, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> Any:
    """The processor's left-padded ``BatchFeature`` of rendered texts with their images."""
    has_images = any(len(imgs) for imgs in images)
    if has_images and not all(len(imgs) for imgs in images):
        raise ValueError("a batch must not mix records with and without images")
    return processor(
        images=[list(imgs) for imgs in images] if has_images else None,
        text=list(texts),
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
    return _splice_answers(encoded, [[] for _ in answers], [[a] for a in answers], pad_id, max_length, row_ids)


def _splice_answers(
    encoded: dict[str, torch.Tensor],
    slots: Sequence[list[int]],
    turns: Sequence[list[list[int]]],
    pad_id: int,
    max_length: int | None,
    row_ids: Sequence[str],
) -> dict[str, torch.Tensor]:
    """Rows of unpadded prompt tokens with their answers spliced in, right-padded; labels cover answers only.

    Row ``i``'s answer ``k < len(turns[i]) - 1`` replaces the placeholder token at position ``slots[i][k]`` of
    its unpadded prompt; its last answer is appended. Per-token processor outputs (any tensor shaped like
    ``input_ids``, e.g. Gemma3 ``token_type_ids``) are re-laid out the same way, with zeros on answer tokens.
    """
    input_ids, attention = encoded["input_ids"], encoded["attention_mask"].bool()
    per_token = [k for k, v in encoded.items() if k not in ("input_ids", "attention_mask")
                 and isinstance(v, torch.Tensor) and v.shape == input_ids.shape]
    rows, labels, extras = [], [], {k: [] for k in per_token}
    for i, answers in enumerate(turns):
        kept = attention[i]
        prompt = input_ids[i][kept]
        cuts = [-1, *slots[i], len(prompt)]
        spans = [(cuts[k] + 1, cuts[k + 1]) for k in range(len(answers))]
        answer_tensors = [torch.tensor(answer, dtype=input_ids.dtype) for answer in answers]
        seq = _interleave(prompt, spans, answer_tensors)
        n_answer = sum(len(answer) for answer in answers)
        if max_length is not None and len(seq) > max_length:
            raise SequenceTooLong(
                f"record {row_ids[i]!r}: prompt ({len(seq) - n_answer} tokens incl. image tokens) + "
                f"{'answers' if len(answers) > 1 else 'answer'} ({n_answer} tokens) = {len(seq)} > max_length "
                f"{max_length}; raise max_length or drop the record"
            )
        rows.append(seq)
        labels.append(_interleave(torch.full_like(prompt, IGNORE_INDEX), spans, answer_tensors))
        for key in per_token:
            values = encoded[key][i][kept]
            extras[key].append(_interleave(values, spans, [torch.zeros(len(a), dtype=values.dtype) for a in answers]))
    width = max(len(r) for r in rows)
    out = {k: v for k, v in encoded.items() if k not in per_token and k not in ("input_ids", "attention_mask")}
    out["input_ids"] = right_pad(rows, width, pad_id)
    out["attention_mask"] = right_pad([torch.ones_like(r) for r in rows], width, 0)
    out["labels"] = right_pad(labels, width, IGNORE_INDEX)
    for key in per_token:
        out[key] = right_pad(extras[key], width, 0)
    return out


def _interleave(values: torch.Tensor, spans: list[tuple[int, int]], fills: list[torch.Tensor]) -> torch.Tensor:
    """``values[a:b]`` of each span followed by its fill, concatenated (1-D)."""
    return torch.cat([piece for (a, b), fill in zip(spans, fills) for piece in (values[a:b], fill)])


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


def collate_turns(processor: Any, records: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                  max_length: int | None = None) -> dict[str, torch.Tensor]:
    """SFT batch that trains every assistant turn: one row per record, all of its images with it.

    A record whose message prompt holds earlier assistant turns becomes the row ``p_1 a_1 ... p_n <chosen>`` of
    ``conversation_pieces``; ``labels`` [B, T] hold the ``answer_ids`` (text + EOS) of every answer and -100
    elsewhere. Each answer's prefix is, token for token, the row the model sees when it generates that turn
    (and, for templates that render past answers as text + EOS, ``collate_sft`` of the conversation cut after
    that turn). The pieces are processed in one call with an EOS in each answer's place, so images are encoded
    and expanded once per row; each placeholder is then replaced by its answer. A text prompt gives exactly
    the ``collate_sft`` row.
    """
    if len(records) != len(images):
        raise ValueError(f"{len(records)} records but {len(images)} image lists")
    tokenizer = processor.tokenizer
    eos = tokenizer.eos_token
    texts, turns, marks = [], [], []
    for record, imgs in zip(records, images):
        try:
            pieces = conversation_pieces(processor, record.prompt, len(imgs))
        except ValueError as err:
            raise ValueError(f"record {record.id!r}: {err}") from err
        texts.append(eos.join(pieces))
        turns.append([answer_ids(tokenizer, a) for a in [*earlier_answers(record.prompt), record.chosen]])
        # how many EOS of the row come up to and including the one standing in for each earlier answer
        marks.append(list(itertools.accumulate(piece.count(eos) + 1 for piece in pieces[:-1])))
    encoded = _process(processor, texts, images)
    slots = []
    for i, (record, ends) in enumerate(zip(records, marks)):
        row = encoded["input_ids"][i][encoded["attention_mask"][i].bool()]
        positions = (row == tokenizer.eos_token_id).nonzero().flatten().tolist()
        expected = texts[i].count(eos)
        if len(positions) != expected:
            raise ValueError(f"record {record.id!r}: the processor made {len(positions)} EOS tokens of the "
                             f"{expected} EOS strings in the rendered conversation")
        slots.append([positions[end - 1] for end in ends])
    return _splice_answers(encoded, slots, turns, tokenizer.pad_token_id, max_length, [r.id for r in records])


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

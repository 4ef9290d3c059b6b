"""Collation of sampled answers given as token ids: the batches of the RL update and of its log-prob passes.

An RL rollout is scored on exactly the tokens the policy sampled (``sampling.generate.generate_ids``), so the
answers arrive as ids, not text. Two layouts, as for preference batches (``mmalign.models.layouts``):
- ``collate_rollouts_prefix``: each prompt (with its images) once, its k answers as rows against its KV
  cache (``models.prefix_cache.prefix_cache_token_logps``);
- ``collate_rollouts_plain``: one row [prompt | answer] per answer, prompt and images repeated (any family).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmalign.data.collate import append_answers, encode_prompts, right_pad


def _check(prompts: Sequence[Any], images: Sequence[Any], answers: Sequence[list[int]], group: Sequence[int]) -> None:
    if len(prompts) != len(images) or len(answers) != len(group):
        raise ValueError(f"{len(prompts)} prompts / {len(images)} image lists, {len(answers)} answers / "
                         f"{len(group)} group indices")
    if any(not a for a in answers):
        raise ValueError("an answer has no token")
    if any(not 0 <= g < len(prompts) for g in group):
        raise ValueError(f"group indices must be in [0, {len(prompts)})")


def collate_rollouts_prefix(processor: Any, prompts: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                            answers: Sequence[list[int]], group: Sequence[int]) -> dict[str, torch.Tensor]:
    """G left-padded prompts with their images ([G, T_p] + image tensors) and N answer rows: ``answer_ids`` /
    ``answer_mask`` [N, A] (right-padded token ids), ``answer_record`` [N] = ``group`` (prompt of each row)."""
    _check(prompts, images, answers, group)
    encoded = dict(encode_prompts(processor, prompts, images))
    rows = [torch.tensor(a, dtype=encoded["input_ids"].dtype) for a in answers]
    width = max(len(row) for row in rows)
    encoded["answer_ids"] = right_pad(rows, width, processor.tokenizer.pad_token_id)
    encoded["answer_mask"] = right_pad([torch.ones_like(row) for row in rows], width, 0)
    encoded["answer_record"] = torch.tensor(list(group))
    return encoded


def collate_rollouts_plain(processor: Any, prompts: Sequence[Any], images: Sequence[Sequence[Image.Image]],
                           answers: Sequence[list[int]], group: Sequence[int]) -> dict[str, torch.Tensor]:
    """N rows [prompt of group[n] | answers[n]], right-padded, ``labels`` -100 except on answer tokens (the
    layout of ``collate.collate_sft``)."""
    _check(prompts, images, answers, group)
    encoded = encode_prompts(processor, [prompts[g] for g in group], [images[g] for g in group])
    row_ids = [f"row {n}" for n in range(len(group))]
    return append_answers(encoded, answers, processor.tokenizer.pad_token_id, None, row_ids)

"""Reward-model forwards: every answer of a preference batch scored in one pass, in the three batch layouts.

A ``ScalarHeadModel`` (``mmalign.models.heads``) runs the batch of a layout of ``mmalign.models.layouts``; each
answer's reward is the head's score at its last token (the EOS). With ``prefix_cache`` and ``shared_prefix`` the
image and prompt are encoded once per record whatever the number of answers (R prompts, not R x (1 + K)); the
``plain`` layout repeats them per answer and is the reference. All three give the same rewards and gradients
(``tests/unit/test_reward_forward.py``).

MM-RLHF's critique-based reward model (arXiv 2502.10391 Sec. 3.2) reads its reward after a critique: each
answer slot then holds the text ``answer + separator + critique`` (``critique_answers``), the last
``critique_tokens`` tokens of it (the critique and EOS) are teacher-forced (Eq. 2: their log-probs are returned)
and the reward is read at the EOS after the critique (Eq. 3). Logits are built only where they predict a
critique token, so a Bradley-Terry batch (no critique tokens) builds none.

Batch: the layout's collate output plus ``critique_tokens`` long[R, S] (``reward_batch``); S = 1 + K answer slots,
slot 0 the chosen answer, slot j the j-th rejected one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from accelerate.utils import extract_model_from_parallel
from PIL import Image
from torch import Tensor

from mmalign.data.collate import IGNORE_INDEX, collate_preference, right_pad
from mmalign.data.packing import CHOSEN_SEGMENT, PREFIX_SEGMENT, collate_prefix_cache, collate_shared_prefix
from mmalign.data.schema import PreferenceRecord
from mmalign.models.heads import last_token_index
from mmalign.models.logprobs import model_inputs, picked_token_logps, predicting_positions
from mmalign.models.prefix_cache import prefix_cache_calls
from mmalign.models.shared_prefix import packed_logits_plan, packed_token_logps, shared_prefix_inputs


class RewardForward(NamedTuple):
    """Per answer slot of R records (S = 1 + K slots, slot 0 chosen; 0 where a record has fewer answers):
    rewards float32[R, S]; slot_mask bool[R, S]; critique_logps float32[R, S] summed log-probs of the critique
    tokens; critique_lengths float32[R, S] their counts (0 for a Bradley-Terry batch)."""

    rewards: Tensor
    slot_mask: Tensor
    critique_logps: Tensor
    critique_lengths: Tensor


def critique_answers(record: PreferenceRecord, critiques: Mapping[str, Any], separator: str,
                     tokenizer: Any) -> tuple[PreferenceRecord, list[int]]:
    """``record`` with each answer y replaced by ``y + separator + c`` (c its critique: ``critiques["chosen"]``,
    ``critiques["rejected"][j]``), and per slot the number of critique tokens: the trailing tokens of the answer
    (EOS included) that end after ``y + separator``.

    The whole text is tokenized at once (as ``answer_ids`` does) and tokens are told apart by their character
    offsets, so the count is right for any tokenizer, however it merges across the boundary.
    """
    texts = [(record.chosen, critiques["chosen"]), *zip(record.rejected, critiques["rejected"], strict=True)]
    answers, counts = [], []
    for answer, critique in texts:
        head = answer + separator
        enc = tokenizer(head + critique, add_special_tokens=False, return_offsets_mapping=True)
        counts.append(sum(end > len(head) for _, end in enc["offset_mapping"]) + 1)  # + EOS
        answers.append(head + critique)
    return dataclasses.replace(record, chosen=answers[0], rejected=answers[1:]), counts


def reward_batch(layout: str, processor: Any, records: Sequence[PreferenceRecord],
                 images: Sequence[Sequence[Image.Image]], max_length: int | None,
                 critique_tokens: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """The ``layout`` batch of ``records`` plus ``critique_tokens`` long[R, S] (None: a Bradley-Terry batch)."""
    batch = REWARD_LAYOUTS[layout][0](processor, records, images, max_length)
    counts = critique_tokens if critique_tokens is not None else [[0] * (1 + len(r.rejected)) for r in records]
    batch["critique_tokens"] = right_pad([torch.tensor(c) for c in counts], max(len(c) for c in counts), 0)
    return batch


def _suffix(token_mask: Tensor, n: Tensor) -> Tensor:
    """bool[N, T]: the last ``n[i]`` True positions of each row of ``token_mask`` bool[N, T]."""
    from_end = token_mask.flip(-1).long().cumsum(-1).flip(-1)  # 1 at the last True position of a row
    return token_mask & (from_end <= n[:, None])


def _per_slot(rows: Tensor, record: Tensor, slot: Tensor, shape: tuple[int, int]) -> Tensor:
    """Scatter one value per answer row [N] into [R, S] by (record, slot); 0 where no answer."""
    return rows.new_zeros(shape).index_put((record, slot), rows)


def _from_rows(rewards: Tensor, token_logps: Tensor, critique_mask: Tensor, record: Tensor, slot: Tensor,
               n_slots: int) -> RewardForward:
    shape = (int(record.max()) + 1, n_slots)
    present = torch.zeros(shape, dtype=torch.bool, device=rewards.device).index_put(
        (record, slot), torch.ones_like(record, dtype=torch.bool))
    return RewardForward(_per_slot(rewards.float(), record, slot, shape), present,
                         _per_slot(token_logps.sum(-1).float(), record, slot, shape),
                         _per_slot(critique_mask.sum(-1).float(), record, slot, shape))


def _head_model(model: Any) -> Any:
    """The bare VLM inside a (wrapped) ``ScalarHeadModel``: its attributes drive masks and positions."""
    return extract_model_from_parallel(model).backbone


def plain_rewards(model: Any, batch: Mapping[str, Any]) -> RewardForward:
    """Rewards of a ``collate_preference`` batch: one row per (record, answer), prompt and images repeated."""
    labels = batch["labels"]
    record, slot = batch["row_record"], batch["row_answer"]
    answer_mask = labels != IGNORE_INDEX
    critique_mask = _suffix(answer_mask, batch["critique_tokens"][record, slot])
    inputs = model_inputs({k: v for k, v in batch.items() if k != "critique_tokens"})
    out = model(**inputs, logits_to_keep=predicting_positions(critique_mask), use_cache=False)
    last = last_token_index(batch["attention_mask"])
    rewards = out.scores[torch.arange(len(last), device=last.device), last]
    token_logps = picked_token_logps(out.logits, labels, critique_mask)
    return _from_rows(rewards, token_logps, critique_mask, record, slot, batch["critique_tokens"].shape[1])


def shared_prefix_rewards(model: Any, batch: Mapping[str, Any]) -> RewardForward:
    """Rewards of a ``collate_shared_prefix`` batch: one packed row [prefix | answer_0 | ... | answer_K] per record."""
    segments, order, labels = batch["segment_ids"], batch["order_ids"], batch["labels"]
    answer_mask = labels != IGNORE_INDEX
    n_slots = batch["critique_tokens"].shape[1]
    slot = (segments - CHOSEN_SEGMENT).clamp(min=0)  # [R, L]; prefix and padding read as slot 0, masked below
    ones = answer_mask.long()
    lengths = torch.zeros(len(segments), n_slots, dtype=torch.long, device=segments.device).scatter_add(1, slot, ones)
    prefix = (segments == PREFIX_SEGMENT).sum(dim=1, keepdim=True)
    from_end = lengths.gather(1, slot) - (order - prefix)  # 1 at each answer's last token
    critique_mask = answer_mask & (from_end <= batch["critique_tokens"].gather(1, slot))
    keep, predictor = packed_logits_plan(segments, critique_mask)
    inputs = shared_prefix_inputs(_head_model(model), {k: v for k, v in batch.items() if k != "critique_tokens"})
    out = model(**inputs, logits_to_keep=keep, use_cache=False)
    token_logps = packed_token_logps(out.logits, keep, predictor, labels, critique_mask)
    positions = torch.arange(segments.shape[1], device=segments.device).expand_as(segments)
    last = torch.full((len(segments), n_slots), -1, dtype=torch.long, device=segments.device).scatter_reduce(
        1, slot, torch.where(answer_mask, positions, -1), reduce="amax")  # each answer's last packed position
    present = last >= 0
    rewards = out.scores.gather(1, last.clamp(min=0)) * present
    sums = token_logps.new_zeros(len(segments), n_slots).scatter_add(1, slot, token_logps * critique_mask)
    counts = torch.zeros_like(sums).scatter_add(1, slot, critique_mask.to(sums.dtype))
    return RewardForward(rewards.float(), present, sums.float(), counts.float())


def prefix_cache_rewards(model: Any, batch: Mapping[str, Any]) -> RewardForward:
    """Rewards of a ``collate_prefix_cache`` batch: prompts once with their KV cache, answer rows against it."""
    answer_ids, answer_mask = batch["answer_ids"], batch["answer_mask"].bool()
    record, slot = batch["answer_record"], batch["answer_slot"]
    critique_mask = _suffix(answer_mask, batch["critique_tokens"][record, slot])  # never an answer's first token
    inputs = {k: v for k, v in batch.items() if k != "critique_tokens"}
    _, rest = prefix_cache_calls(model, _head_model(model), inputs, predicting_positions(critique_mask))
    last = answer_mask.sum(dim=1) - 1
    rewards = rest.scores[torch.arange(len(last), device=last.device), last]
    token_logps = picked_token_logps(rest.logits, answer_ids, critique_mask)
    return _from_rows(rewards, token_logps, critique_mask, record, slot, batch["critique_tokens"].shape[1])


REWARD_LAYOUTS = {
    "prefix_cache": (collate_prefix_cache, prefix_cache_rewards),
    "shared_prefix": (collate_shared_prefix, shared_prefix_rewards),
    "plain": (collate_preference, plain_rewards),
}

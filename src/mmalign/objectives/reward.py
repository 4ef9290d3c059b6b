"""Reward-model losses: Bradley-Terry (Apple arXiv 2407.02477 Eq. 1; MM-RLHF arXiv 2502.10391 Eq. 1) and the
critique term of MM-RLHF's critique-based reward model (Eq. 2; Eq. 3 is the Bradley-Terry loss on rewards read
after the critique).

Pure functions of rewards and summed log-probs; they never call a model, reduce over the batch or move devices.
Shapes: B records, K rejected answers per chosen answer, S = 1 + K answer slots (slot 0 = chosen).
"""

from __future__ import annotations

from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor


class RewardLosses(NamedTuple):
    """losses: float[B, K] unreduced per (chosen, rejected_k) pair; margins: float[B, K] r+ - r-_k (detached)."""

    losses: Tensor
    margins: Tensor


def bradley_terry(chosen_rewards: Tensor, rejected_rewards: Tensor, *, margin: float | Tensor = 0.0,
                  center: float = 0.0) -> RewardLosses:
    """Bradley-Terry loss per pair, float[B, K]: ``-log sigmoid(r+ - r-_k - m_k) + center * (r+ + r-_k)**2``.

    chosen_rewards: float[B]; rejected_rewards: float[B, K]; ``margin``: a float or float[B, K], subtracted inside
    the sigmoid (Llama 2's rating margin, TRL's ``margin`` column; 0 = Apple Eq. 1 exactly); ``center``: TRL's
    ``center_rewards_coefficient`` (MM-RLHF trains with 0.01), which pulls each pair's reward sum towards 0 so
    the scale stays anchored. The mean over pairs of these losses is TRL 1.16's ``RewardTrainer`` loss for K = 1.
    """
    if chosen_rewards.dim() != 1 or rejected_rewards.dim() != 2 or rejected_rewards.shape[0] != chosen_rewards.shape[0]:
        raise ValueError(f"expected chosen rewards [B] and rejected rewards [B, K], got "
                         f"{tuple(chosen_rewards.shape)} and {tuple(rejected_rewards.shape)}")
    if isinstance(margin, Tensor) and margin.shape != rejected_rewards.shape:
        raise ValueError(f"margin has shape {tuple(margin.shape)}, expected {tuple(rejected_rewards.shape)}")
    chosen = chosen_rewards.unsqueeze(-1)
    gap = chosen - rejected_rewards
    losses = -F.logsigmoid(gap - margin)
    if center:
        losses = losses + center * (chosen + rejected_rewards) ** 2
    return RewardLosses(losses, gap.detach())


def critique_nll(critique_logps: Tensor, critique_lengths: Tensor, slot_mask: Tensor) -> Tensor:
    """Critique NLL per record (MM-RLHF Eq. 2, teacher-forced), float[B].

    critique_logps: float[B, S] summed log-probs of each answer's critique tokens; critique_lengths: float[B, S]
    their token counts; slot_mask: bool[B, S] (False where a record has fewer answers). Each answer's NLL is its
    token mean (as the LM cross-entropy of MM-RLHF's code; Eq. 2 writes a sum), and a record's value is the mean
    over its answers, so the loss stays a mean over examples and gradient accumulation splits it exactly.
    """
    if not critique_logps.shape == critique_lengths.shape == slot_mask.shape:
        raise ValueError(f"critique_logps {tuple(critique_logps.shape)}, critique_lengths "
                         f"{tuple(critique_lengths.shape)} and slot_mask {tuple(slot_mask.shape)} must all be [B, S]")
    if bool((critique_lengths[slot_mask] < 1).any()):
        raise ValueError("an answer slot has no critique token")
    mask = slot_mask.to(critique_logps.dtype)
    per_answer = -critique_logps / critique_lengths.clamp(min=1.0)
    return (per_answer * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)

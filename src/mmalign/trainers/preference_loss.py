"""The per-record preference loss every preference recipe (offline, online, mixed) trains with, and its metrics.

``PreferenceLossConfig`` names a loss of ``objectives.preference.PREFERENCE_LOSSES``; ``record_losses`` turns one
forward's log-probs into per-record losses (Apple Eq. 5 over K rejected slots, plus MM-DPO's SFT term) and the
sums of ``PAIR_STATS``; ``preference_metrics`` makes the logged step means from those sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from mmalign.models.logprobs import PreferenceForward
from mmalign.objectives.preference import PREFERENCE_LOSSES, PreferenceLogps, combine_rejected, sft_nll

# Per-step sums of the pair statistics, reduced over micro-batches and processes; every preference recipe logs
# them with "loss" and "n_records" (``record_losses``, ``preference_metrics``).
PAIR_STATS = ("chosen_reward", "rejected_reward", "margin", "accuracy", "n_pairs")


@dataclass
class PreferenceLossConfig:
    """The preference loss (``PREFERENCE_LOSSES``: dpo / ipo / slic), its beta, label smoothing, SFT weight."""

    name: Literal["dpo", "ipo", "slic"] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        # "not (valid)" so that NaN, for which every comparison is false, is refused too.
        if not (0 < self.beta < math.inf and 0 <= self.label_smoothing < 0.5 and 0 <= self.sft_weight < math.inf):
            raise ValueError(f"loss needs a finite beta > 0, 0 <= label_smoothing < 0.5 and a finite sft_weight >= 0; "
                             f"got beta={self.beta}, label_smoothing={self.label_smoothing}, "
                             f"sft_weight={self.sft_weight}")


def record_losses(loss: PreferenceLossConfig, out: PreferenceForward, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, slot_weights: list[float], beta: float | torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per-record loss float[R], its SFT NLL float[R] and the sums of ``PAIR_STATS`` (R records, K rejected slots).

    The loss is the ``slot_weights``-weighted mean over a record's rejected slots of the pair losses (Apple Eq. 5)
    plus ``loss.sft_weight`` x the chosen answer's NLL; ``beta``: ``loss.beta`` or a beta per record float[R] (MM-DPO).
    """
    logps = PreferenceLogps(out.chosen_logps, out.rejected_logps, ref_chosen, ref_rejected,
                            out.chosen_lengths, out.rejected_lengths)
    pair = PREFERENCE_LOSSES[loss.name](logps, beta=beta, label_smoothing=loss.label_smoothing)
    per_record = combine_rejected(pair.losses, out.rejected_mask, torch.tensor(slot_weights, device=pair.losses.device))
    sft = sft_nll(out.chosen_token_logps, out.chosen_mask)
    mask = out.rejected_mask.float()
    margin = (pair.chosen_rewards.unsqueeze(-1) - pair.rejected_rewards) * mask
    sums = [pair.chosen_rewards.sum(), (pair.rejected_rewards * mask).sum(), margin.sum(),
            ((margin > 0).float() * mask).sum(), mask.sum()]
    return per_record + loss.sft_weight * sft, sft, sums


def preference_metrics(s: dict[str, float]) -> dict[str, float]:
    """Step means from the reduced sums: the loss and chosen reward per record, the rest per rejected slot."""
    n = s["n_pairs"]
    return {"loss": s["loss"] / s["n_records"], "rewards/chosen": s["chosen_reward"] / s["n_records"],
            "rewards/rejected": s["rejected_reward"] / n, "rewards/margin": s["margin"] / n,
            "rewards/accuracy": s["accuracy"] / n}

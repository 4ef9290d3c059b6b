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
from mmalign.objectives.preference import (
    LOSS_ALIASES, PREFERENCE_LOSSES, PreferenceLogps, combine_rejected, sft_nll,
)

# Per-step sums of the pair statistics, reduced over micro-batches and processes; every preference recipe logs
# them with "loss" and "n_records" (``record_losses``, ``preference_metrics``).
PAIR_STATS = ("chosen_reward", "rejected_reward", "margin", "accuracy", "n_pairs", "chosen_logps", "rejected_logps")


@dataclass
class PreferenceLossConfig:
    """The preference loss (``PREFERENCE_LOSSES``), its beta, label smoothing, SFT weight."""

    # dpo / ipo / slic, or none (the SFT term alone: a control); TRL's loss_type names sigmoid (= dpo) and
    # hinge (= slic) are saved as dpo / slic
    name: Literal["dpo", "ipo", "slic", "none", "sigmoid", "hinge"] = "dpo"
    beta: float = 0.1  # KL strength; for IPO the tau of its squared loss (TRL's beta)
    label_smoothing: float = 0.0  # conservative-DPO chance that a pair's label is flipped
    sft_weight: float = 0.0  # weight of the chosen answer's NLL added to the loss (MM-DPO / RPO)

    def __post_init__(self) -> None:
        self.name = LOSS_ALIASES.get(self.name, self.name)
        # "not (valid)" so that NaN, for which every comparison is false, is refused too.
        if not (0 < self.beta < math.inf and 0 <= self.label_smoothing < 0.5 and 0 <= self.sft_weight < math.inf):
            raise ValueError(f"loss needs a finite beta > 0, 0 <= label_smoothing < 0.5 and a finite sft_weight >= 0; "
                             f"got beta={self.beta}, label_smoothing={self.label_smoothing}, "
                             f"sft_weight={self.sft_weight}")
        if self.name == "none" and self.sft_weight == 0:
            raise ValueError("loss.name=none trains nothing without its SFT term: set loss.sft_weight > 0")


def record_losses(loss: PreferenceLossConfig, out: PreferenceForward, ref_chosen: torch.Tensor,
                  ref_rejected: torch.Tensor, slot_weights: list[float], beta: float | torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per-record loss float[R], its SFT NLL float[R] and the sums of ``PAIR_STATS`` (R records, K rejected slots).

    The loss is the ``slot_weights``-weighted mean over a record's rejected slots of the pair losses (Apple Eq. 5)
    plus ``loss.sft_weight`` x the chosen answer's NLL; ``beta``: ``loss.beta``, or (MM-DPO) a beta per record
    float[R] or per rejected slot float[R, K].
    """
    logps = PreferenceLogps(out.chosen_logps, out.rejected_logps, ref_chosen, ref_rejected,
                            out.chosen_lengths, out.rejected_lengths)
    pair = PREFERENCE_LOSSES[loss.name](logps, beta=beta, label_smoothing=loss.label_smoothing)
    per_record = combine_rejected(pair.losses, out.rejected_mask, torch.tensor(slot_weights, device=pair.losses.device))
    sft = sft_nll(out.chosen_token_logps, out.chosen_mask)
    mask = out.rejected_mask.float()
    margin = (pair.chosen_rewards - pair.rejected_rewards) * mask
    chosen = (pair.chosen_rewards * mask).sum(dim=-1) / mask.sum(dim=-1)  # per record: its pairs' mean
    sums = [chosen.sum(), (pair.rejected_rewards * mask).sum(), margin.sum(),
            ((margin > 0).float() * mask).sum(), mask.sum(), out.chosen_logps.detach().sum(),
            out.rejected_logps.detach().masked_fill(~out.rejected_mask, 0.0).sum()]
    return per_record + loss.sft_weight * sft, sft, sums


def preference_metrics(s: dict[str, float]) -> dict[str, float]:
    """Step means from the reduced sums, under TRL's ``DPOTrainer`` metric names: the loss and the chosen
    answer's reward and summed log-prob per record, the rest per rejected slot (with one rejected answer per
    record, exactly TRL's batch means; ``rewards/accuracies`` counts margins > 0, as TRL does)."""
    n, r = s["n_pairs"], s["n_records"]
    return {"loss": s["loss"] / r, "rewards/chosen": s["chosen_reward"] / r,
            "rewards/rejected": s["rejected_reward"] / n, "rewards/margins": s["margin"] / n,
            "rewards/accuracies": s["accuracy"] / n,
            "logps/chosen": s["chosen_logps"] / r, "logps/rejected": s["rejected_logps"] / n}

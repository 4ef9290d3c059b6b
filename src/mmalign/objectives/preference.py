"""Offline preference losses: DPO, IPO, SLiC, none (an SFT-only control), an SFT term, MM-DPO's per-pair
beta, K rejected per chosen.

Pure functions of summed sequence log-probs; they never call a model, read a config, reduce over the
batch or move devices. Shapes: B prompts, K rejected answers per chosen answer (K >= 1).

Every pairwise loss is a function of the implicit-reward gap (DPO, Rafailov et al. 2023; Apple
arXiv 2407.02477 Eq. 3)

    delta[b, k] = (policy_chosen_logps[b] - ref_chosen_logps[b]) - (policy_rejected_logps[b, k] - ref_rejected_logps[b, k])

and returns one unreduced loss per (chosen, rejected_k) pair plus the detached rewards
``beta * (policy - ref)``. ``beta`` is a float, one value per prompt float[B], or one per pair float[B, K]
(MM-DPO's margin of each rejected answer, see ``mm_dpo_beta``). ``combine_rejected`` averages the K pairwise
losses of a prompt with weights (Apple Eq. 5; POVID's code averages two DPO losses with gamma = 0.5).

Label smoothing follows conservative DPO (Mitchell 2023, TRL <= 0.x ``label_smoothing``): the label is
taken to be flipped with probability ``eps``, so the loss is ``(1 - eps) * l(delta) + eps * l(-delta)``
for each loss ``l``. ``eps = 0`` gives the plain losses, which match TRL 1.16 ``loss_type`` "sigmoid",
"ipo" and "hinge" exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PreferenceLogps(NamedTuple):
    """Summed answer log-probs of one batch of preference pairs.

    policy_chosen_logps, ref_chosen_logps: float[B]; policy_rejected_logps, ref_rejected_logps: float[B, K];
    chosen_lengths: float[B] and rejected_lengths: float[B, K] are answer token counts (used by IPO).
    """

    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    ref_chosen_logps: Tensor
    ref_rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor


class PreferenceLosses(NamedTuple):
    """losses: float[B, K] unreduced per pair; chosen_rewards: float[B, K], the chosen answer's reward in each of
    its pairs (one value per row unless beta is per pair); rejected_rewards: float[B, K] (both detached)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _check_shapes(logps: PreferenceLogps) -> None:
    b = logps.policy_chosen_logps.shape
    bk = logps.policy_rejected_logps.shape
    if len(b) != 1 or len(bk) != 2 or bk[0] != b[0]:
        raise ValueError(f"expected chosen logps [B] and rejected logps [B, K], got {tuple(b)} and {tuple(bk)}")
    for name in ("ref_chosen_logps", "chosen_lengths"):
        if getattr(logps, name).shape != b:
            raise ValueError(f"{name} has shape {tuple(getattr(logps, name).shape)}, expected {tuple(b)}")
    for name in ("ref_rejected_logps", "rejected_lengths"):
        if getattr(logps, name).shape != bk:
            raise ValueError(f"{name} has shape {tuple(getattr(logps, name).shape)}, expected {tuple(bk)}")


def _beta_column(beta: float | Tensor, logps: PreferenceLogps) -> float | Tensor:
    """Beta broadcastable to the pairs [B, K]: a float, a per-prompt float[B] as [B, 1], or a per-pair [B, K]."""
    if not isinstance(beta, Tensor):
        return beta
    b, bk = logps.policy_chosen_logps.shape, logps.policy_rejected_logps.shape
    if beta.shape == b:
        return beta.unsqueeze(-1)
    if beta.shape != bk:
        raise ValueError(f"beta has shape {tuple(beta.shape)}; expected a float, {tuple(b)} or {tuple(bk)}")
    return beta


def _rewards(logps: PreferenceLogps, beta: float | Tensor) -> tuple[Tensor, Tensor]:
    """Detached implicit rewards float[B, K] of the chosen answer (in each pair) and of the rejected ones."""
    b = _beta_column(beta, logps)
    chosen = logps.policy_chosen_logps - logps.ref_chosen_logps
    chosen = (b * chosen.unsqueeze(-1).expand_as(logps.policy_rejected_logps)).detach()
    rejected = (b * (logps.policy_rejected_logps - logps.ref_rejected_logps)).detach()
    return chosen, rejected


def _logratio_gap(logps: PreferenceLogps) -> Tensor:
    """delta[b, k] of the module docstring, float[B, K]."""
    chosen = (logps.policy_chosen_logps - logps.ref_chosen_logps).unsqueeze(-1)
    return chosen - (logps.policy_rejected_logps - logps.ref_rejected_logps)


def _smoothed(loss: Callable[[Tensor], Tensor], x: Tensor, label_smoothing: float) -> Tensor:
    if label_smoothing == 0.0:
        return loss(x)
    return (1.0 - label_smoothing) * loss(x) + label_smoothing * loss(-x)


def dpo(logps: PreferenceLogps, *, beta: float | Tensor, label_smoothing: float = 0.0) -> PreferenceLosses:
    """Sigmoid DPO, Apple Eq. 3: ``-log sigmoid(beta * delta)`` per pair, float[B, K].

    ``beta``: a float, float[B] or float[B, K] (MM-DPO, see ``mm_dpo_beta``).
    """
    _check_shapes(logps)
    b = _beta_column(beta, logps)
    losses = _smoothed(lambda d: -F.logsigmoid(b * d), _logratio_gap(logps), label_smoothing)
    return PreferenceLosses(losses, *_rewards(logps, beta))


def ipo(logps: PreferenceLogps, *, beta: float | Tensor, label_smoothing: float = 0.0) -> PreferenceLosses:
    """IPO (Azar et al. 2023, Eq. 17) with length-normalised log-ratios as TRL does, float[B, K].

    ``(delta_bar - 1 / (2 * beta))**2`` with ``delta_bar`` the gap of per-token-mean log-ratios (each answer's
    log-ratio divided by its own token count, at least 1); ``beta`` plays the role of tau.
    """
    _check_shapes(logps)
    chosen = (logps.policy_chosen_logps - logps.ref_chosen_logps) / logps.chosen_lengths.clamp(min=1.0)
    rejected = (logps.policy_rejected_logps - logps.ref_rejected_logps) / logps.rejected_lengths.clamp(min=1.0)
    gap = chosen.unsqueeze(-1) - rejected
    target = 1.0 / (2.0 * _beta_column(beta, logps))
    losses = _smoothed(lambda d: (d - target) ** 2, gap, label_smoothing)
    return PreferenceLosses(losses, *_rewards(logps, beta))


def slic(logps: PreferenceLogps, *, beta: float | Tensor, label_smoothing: float = 0.0) -> PreferenceLosses:
    """SLiC-HF calibration loss (Zhao et al. 2023) as TRL's hinge: ``max(0, 1 - beta * delta)``, float[B, K].

    The SLiC regulariser (cross-entropy on the chosen answer) is the separate ``sft_nll`` term.
    """
    _check_shapes(logps)
    b = _beta_column(beta, logps)
    losses = _smoothed(lambda d: torch.relu(1.0 - b * d), _logratio_gap(logps), label_smoothing)
    return PreferenceLosses(losses, *_rewards(logps, beta))


def no_preference(logps: PreferenceLogps, *, beta: float | Tensor, label_smoothing: float = 0.0) -> PreferenceLosses:
    """The control of an ablation: zero loss per pair, float[B, K], with DPO's rewards still reported.

    With ``sft_weight`` > 0 a preference run then trains only the SFT term on the chosen answers, on the same
    batches, steps and schedule, so what the pairs add over their chosen answers alone can be measured (the lab's
    Table 6 reads every row against it). ``label_smoothing`` has nothing to act on.
    """
    _check_shapes(logps)
    return PreferenceLosses(torch.zeros_like(logps.policy_rejected_logps), *_rewards(logps, beta))


PREFERENCE_LOSSES: dict[str, Callable[..., PreferenceLosses]] = {"dpo": dpo, "ipo": ipo, "slic": slic,
                                                                 "none": no_preference}
# TRL's ``loss_type`` names of the same losses (its "ipo" is ours already).
LOSS_ALIASES = {"sigmoid": "dpo", "hinge": "slic"}


def mm_dpo_beta(beta0: float, margin: Tensor, *, w: float = 0.5, k: float = 0.5) -> Tensor:
    """MM-DPO dynamic reward scaling (MM-RLHF, arXiv 2502.10391 Sec. 4): one beta per margin, same shape
    (float[B, K] for one margin per (chosen, rejected_k) pair, as ``mmalign score`` writes them).

    ``beta(delta) = beta0 * (1 + w * (1 - exp(-k * delta)))`` with ``delta`` the reward-model margin of the
    pair. Clamped below at ``beta0``: a negative margin (the RM disagrees with the label) is not discussed in
    the paper and must not weaken the pair's KL anchor below the base value.
    """
    beta = beta0 * (1.0 + w * (1.0 - torch.exp(-k * margin)))
    return beta.clamp(min=beta0)


def combine_rejected(losses: Tensor, rejected_mask: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean of the K pairwise losses of each prompt (Apple Eq. 5), float[B].

    losses: float[B, K]; rejected_mask: bool[B, K] (False where a prompt has fewer than K rejected answers);
    weights: float[K], one per rejected slot (Eq. 5's gamma, 1 - gamma). Each row is renormalised over its
    present slots, so a prompt with one rejected answer gets that pair's loss.
    """
    if losses.shape != rejected_mask.shape or weights.shape != losses.shape[-1:]:
        raise ValueError(
            f"losses {tuple(losses.shape)}, rejected_mask {tuple(rejected_mask.shape)} and weights "
            f"{tuple(weights.shape)} must be [B, K], [B, K] and [K]"
        )
    w = weights.to(losses.dtype) * rejected_mask.to(losses.dtype)
    total = w.sum(dim=-1)
    if bool((total <= 0).any()):
        raise ValueError("a prompt has no rejected answer with positive weight")
    return (w * losses).sum(dim=-1) / total


def sft_nll(chosen_token_logps: Tensor, chosen_mask: Tensor) -> Tensor:
    """SFT term on the chosen answer (MM-RLHF's gamma-weighted CE; SLiC's regulariser), float[B].

    chosen_token_logps: float[B, T] log-probs of the chosen answer tokens; chosen_mask: bool[B, T].
    Token-mean NLL per answer. MM-RLHF averages over all tokens of the batch instead; the per-answer mean
    keeps the loss a mean over examples, so gradient accumulation splits it exactly.
    """
    mask = chosen_mask.to(chosen_token_logps.dtype)
    return -(chosen_token_logps * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1.0)

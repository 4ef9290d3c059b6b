"""Policy-gradient math for RL on VLMs: RLOO, GRPO and PPO (Apple arXiv 2407.02477 Eq. 2, Sec. 5.5).

Pure functions of tensors; they never call a model, read a config or move devices. Shapes: G prompts with k
sampled answers each (rewards as float[G, k]), N answer rows of A tokens (``*_token_*`` tensors float[N, A]
with ``mask`` bool[N, A] True on answer tokens, EOS included).

The objective is Eq. 2, ``max E[r(x, y) - beta * KL(pi || pi_ref)]``:
- RLOO (Ahmadian et al. 2024; TRL ``RLOOTrainer``): the KL is a sequence-level penalty inside the reward,
  ``r_i - beta * sum_t kl_t``, and the advantage is the reward minus the mean reward of the other k - 1
  samples of the same prompt (``rloo_advantages``);
- GRPO (Shao et al. 2024, DeepSeekMath Eq. 3): the group-normalised reward ``(r_i - mean) / (std + eps)``
  (``grpo_advantages``); GRPO's paper puts a k3 KL in the loss instead, here the KL stays in the reward so the
  two share one loop and differ only in the advantage function;
- PPO (Schulman et al. 2017; TRL ``PPOTrainer``): per-token rewards ``-beta * kl_t`` plus the score on the
  last answer token (``ppo_token_rewards``), GAE (``gae``), whitened advantages (``whiten``), the clipped
  surrogate (``clipped_policy_loss``) and the clipped value loss (``clipped_value_loss``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out advantages float[G, k]: ``r_i - (sum_j r_j - r_i) / (k - 1)`` within each prompt's group.

    rewards: float[G, k], k >= 2 samples per prompt (Ahmadian et al. 2024, Eq. 8; TRL ``RLOOTrainer``).
    """
    k = rewards.shape[-1]
    if rewards.dim() != 2 or k < 2:
        raise ValueError(f"rewards must be [G, k] with k >= 2, got {tuple(rewards.shape)}")
    baseline = (rewards.sum(dim=-1, keepdim=True) - rewards) / (k - 1)
    return rewards - baseline


def grpo_advantages(rewards: Tensor, eps: float = 1e-4) -> Tensor:
    """Group-normalised advantages float[G, k]: ``(r_i - mean_g) / (std_g + eps)`` (DeepSeekMath Sec. 4.1.2).

    std is the unbiased (Bessel-corrected) standard deviation over the k samples of a prompt and eps = 1e-4,
    as TRL ``GRPOTrainer`` (``scale_rewards="group"``); a group of equal rewards gets advantages 0.
    """
    k = rewards.shape[-1]
    if rewards.dim() != 2 or k < 2:
        raise ValueError(f"rewards must be [G, k] with k >= 2, got {tuple(rewards.shape)}")
    mean = rewards.mean(dim=-1, keepdim=True)
    std = rewards.std(dim=-1, keepdim=True)
    return (rewards - mean) / (std + eps)


ADVANTAGES: dict[str, Callable[[Tensor], Tensor]] = {"rloo": rloo_advantages, "grpo": grpo_advantages}


def kl_k1(policy_token_logps: Tensor, ref_token_logps: Tensor) -> Tensor:
    """k1 estimate of KL(pi || pi_ref) per sampled token: ``log pi - log pi_ref`` (unbiased, can be negative)."""
    return policy_token_logps - ref_token_logps


def kl_k3(policy_token_logps: Tensor, ref_token_logps: Tensor) -> Tensor:
    """k3 estimate per sampled token: ``exp(log pi_ref - log pi) - (log pi_ref - log pi) - 1`` (unbiased, >= 0;
    Schulman, "Approximating KL divergence", 2020)."""
    log_ratio = ref_token_logps - policy_token_logps
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k3": kl_k3}


def sequence_kl(token_kl: Tensor, mask: Tensor) -> Tensor:
    """float[N]: the sequence's KL, the sum of its per-token estimates float[N, A] over answer tokens."""
    return (token_kl * mask).sum(dim=-1)


def ppo_token_rewards(scores: Tensor, token_kl: Tensor, mask: Tensor, beta: float) -> Tensor:
    """Per-token PPO rewards float[N, A]: ``-beta * kl_t`` on every answer token, plus the score float[N] on each
    row's last answer token (TRL ``PPOTrainer``); 0 off the mask."""
    rewards = -beta * token_kl * mask
    last = mask.long().cumsum(dim=-1).argmax(dim=-1)  # index of the last True per row
    rows = torch.arange(len(scores), device=scores.device)
    return rewards.index_put((rows, last), rewards[rows, last] + scores)


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016): (advantages, returns), both float[N, A].

    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = sum_l (gamma * lam)^l delta_{t+l}``, ``returns = A + V``;
    values after the last answer token count as 0 (the episode ends there). 0 off the mask.
    """
    rewards, values = token_rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        following = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased variance, as TRL ``masked_whiten``);
    with ``shift_mean=False`` the mean is added back. 0 off the mask."""
    m = mask.to(values.dtype)
    n = m.sum()
    if n < 2:
        raise ValueError("whitening needs at least two masked values")
    mean = (values * m).sum() / n
    var = (((values - mean) * m) ** 2).sum() / (n - 1)
    out = (values - mean) * torch.rsqrt(var + eps)
    return (out if shift_mean else out + mean) * m


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor,
                        clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's clipped surrogate, unreduced: ``max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps))`` with
    ``rho = exp(logps - old_logps)``; any matching shapes (sequence level [N] as TRL RLOO, token level [N, A] as
    PPO). Returns (losses, clipped) where ``clipped`` (bool, same shape) marks where the clipped term won."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped_term = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped_term), (clipped_term > unclipped).detach()


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor,
                       clip: float = 0.2) -> tuple[Tensor, Tensor]:
    """PPO's clipped value loss, unreduced: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``
    (TRL ``PPOTrainer``). Returns (losses, clipped) like ``clipped_policy_loss``."""
    clamped = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, limited = (values - returns) ** 2, (clamped - returns) ** 2
    return 0.5 * torch.maximum(plain, limited), (limited > plain).detach()

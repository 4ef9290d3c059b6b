"""Policy-gradient math against hand-computed values, naive loops and TRL 1.16's formulas (RLOO, GRPO)."""

from __future__ import annotations

import pytest
import torch

from mmalign.objectives.policy_gradient import (
    ADVANTAGES, KL_ESTIMATORS, clipped_policy_loss, clipped_value_loss, gae, grpo_advantages, kl_k1, kl_k3,
    ppo_token_rewards, rloo_advantages, sequence_kl, whiten,
)


def test_rloo_leave_one_out_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]])
    # 1 - (2 + 6) / 2 = -3; 2 - (1 + 6) / 2 = -1.5; 6 - (1 + 2) / 2 = 4.5
    torch.testing.assert_close(rloo_advantages(rewards), torch.tensor([[-3.0, -1.5, 4.5], [0.0, 0.0, 0.0]]))
    # = k / (k - 1) x (r - mean): the baseline-corrected reward of Ahmadian et al.
    torch.testing.assert_close(rloo_advantages(rewards), 1.5 * (rewards - rewards.mean(-1, keepdim=True)))
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.ones(3, 1))


def test_rloo_matches_trl_rloo_formula():
    """TRL 1.16 RLOOTrainer: baselines = (grouped_sum - grouped_rewards) / (count - 1); A = r - baseline."""
    rewards = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    grouped_sum = torch.nansum(rewards, dim=1, keepdim=True)
    scorable = (~torch.isnan(rewards)).sum(dim=1, keepdim=True)
    trl = rewards - (grouped_sum - rewards) / (scorable - 1)
    torch.testing.assert_close(rloo_advantages(rewards), trl)


def test_grpo_by_hand_and_against_trl_nanstd():
    from trl.trainer.utils import nanstd

    rewards = torch.tensor([[1.0, 3.0], [2.0, 2.0]])
    # mean 2, unbiased std sqrt(2): (1 - 2) / (sqrt 2 + 1e-4); equal rewards -> 0
    expected = torch.tensor([[-1.0, 1.0], [0.0, 0.0]]) / (2 ** 0.5 + 1e-4)
    torch.testing.assert_close(grpo_advantages(rewards), expected)
    wide = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    mean = wide.mean(dim=1, keepdim=True)
    trl = (wide - mean) / (nanstd(wide, dim=1).unsqueeze(1) + 1e-4)  # GRPOTrainer, scale_rewards="group"
    torch.testing.assert_close(grpo_advantages(wide), trl)
    assert set(ADVANTAGES) == {"rloo", "grpo"}


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.0, -1.0, -1.5])
    torch.testing.assert_close(kl_k1(logp, ref), torch.tensor([0.0, -1.0, 1.0]))
    d = ref - logp  # [0, 1, -1]
    torch.testing.assert_close(kl_k3(logp, ref), torch.exp(d) - d - 1)
    assert kl_k3(logp, ref)[0] == 0 and bool((kl_k3(logp, ref) >= 0).all())
    # TRL GRPOTrainer's per_token_kl (k3): exp(ref - logp) - (ref - logp) - 1
    torch.testing.assert_close(KL_ESTIMATORS["k3"](logp, ref), torch.exp(ref - logp) - (ref - logp) - 1)
    mask = torch.tensor([[True, True, False]])
    assert sequence_kl(torch.tensor([[0.5, 0.25, 9.0]]), mask).tolist() == [0.75]


def test_ppo_token_rewards_put_the_score_on_the_last_answer_token():
    token_kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = ppo_token_rewards(torch.tensor([1.0, -2.0]), token_kl, mask, beta=0.5)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.25 - 2.0, 0.0, 0.0]]))


def _naive_gae(rewards, values, length, gamma, lam):
    out = []
    for t in range(length):
        total = 0.0
        for l_ in range(t, length):
            following = values[l_ + 1] if l_ + 1 < length else 0.0
            total += (gamma * lam) ** (l_ - t) * (rewards[l_] + gamma * following - values[l_])
        out.append(total)
    return out


def test_gae_by_hand_and_against_a_naive_sum():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.5]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta = [0 + .25 - .5, 0 + .5 - .25, 1 - .5] = [-.25, .25, .5]; A2 = .5; A1 = .25 + .25 = .5; A0 = -.25 + .25
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 0.5]]))
    torch.testing.assert_close(ret, adv + values)
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    lengths = [6, 4, 1]
    mask = torch.arange(6)[None] < torch.tensor(lengths)[:, None]
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)
    for row, n in enumerate(lengths):
        expected = _naive_gae(rewards[row].tolist(), values[row].tolist(), n, 0.9, 0.95)
        torch.testing.assert_close(adv[row, :n], torch.tensor(expected))
        assert adv[row, n:].abs().sum() == 0 and ret[row, n:].abs().sum() == 0


def test_whiten_over_the_mask_with_unbiased_variance():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    out = whiten(values, mask)
    # mean 2.5, unbiased var 5/3 over [1, 2, 3, 4]
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / (5 / 3 + 1e-8) ** 0.5
    torch.testing.assert_close(out[mask], expected)
    assert out[~mask].abs().sum() == 0
    torch.testing.assert_close(whiten(values, mask, shift_mean=False)[mask], expected + 2.5)
    with pytest.raises(ValueError, match="two"):
        whiten(values, torch.zeros_like(mask).index_fill_(1, torch.tensor([0]), True)[:1])


def test_clipped_policy_loss_by_hand_and_as_trl_rloo():
    logps = torch.tensor([0.0, 0.5, -0.5, 0.5])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    losses, clipped = clipped_policy_loss(logps, old, adv, clip=0.2)
    r = torch.exp(logps)  # [1, 1.65, 0.61, 1.65]
    # A > 0 and ratio > 1.2: clipped to -1.2; A < 0 and ratio < 0.8: clipped to +0.8; A < 0, ratio up: unclipped
    torch.testing.assert_close(losses, torch.tensor([-1.0, -1.2, 0.8, r[3].item()]))
    assert clipped.tolist() == [False, True, True, False]
    coef_1 = torch.exp(logps - old)  # TRL RLOOTrainer._compute_loss
    trl = -torch.min(coef_1 * adv, torch.clamp(coef_1, 0.8, 1.2) * adv)
    torch.testing.assert_close(losses, trl)
    # on-policy (ratio 1) the gradient is -A d log pi: REINFORCE with the baseline
    logps.requires_grad_(True)
    clipped_policy_loss(logps, logps.detach(), adv)[0].sum().backward()
    torch.testing.assert_close(logps.grad, -adv)


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 2.5]), torch.tensor([1.0, 1.0, 0.0])
    losses, clipped = clipped_value_loss(values, old, returns, clip=0.2)
    # row 0: plain 0, clipped (0.2 - 1)^2 = 0.64 -> 0.32; row 1: both 1 -> 0.5; row 2: 2^2 vs 2.3^2 -> 2.645
    torch.testing.assert_close(losses, torch.tensor([0.32, 0.5, 2.645]))
    assert clipped.tolist() == [True, False, True]

"""Reward-model losses (``mmalign.objectives.reward``) and MM-DPO's per-pair beta: hand-computed values, and
parity with TRL 1.16's ``RewardTrainer.compute_loss``."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmalign.objectives.preference import PreferenceLogps, dpo, mm_dpo_beta
from mmalign.objectives.reward import bradley_terry, critique_nll


def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_bradley_terry_hand_computed():
    chosen = torch.tensor([1.0, 0.0])
    rejected = torch.tensor([[0.0, 2.0], [-1.0, 0.0]])
    out = bradley_terry(chosen, rejected)
    # -log sigmoid(g) = log(1 + e^-g); gaps [[1, -1], [1, 0]]
    expected = [[_softplus(-1.0), _softplus(1.0)], [_softplus(-1.0), math.log(2.0)]]
    torch.testing.assert_close(out.losses, torch.tensor(expected), atol=1e-6, rtol=0)
    assert out.margins.tolist() == [[1.0, -1.0], [1.0, 0.0]]
    margin = torch.tensor([[0.5, 0.0], [2.0, -1.0]])
    with_margin = bradley_terry(chosen, rejected, margin=margin, center=0.1).losses
    # gap - margin: [[0.5, -1], [-1, 1]]; centring 0.1 (r+ + r-)^2: [[0.1, 0.9], [0.1, 0]]
    expected = [[_softplus(-0.5) + 0.1, _softplus(1.0) + 0.9], [_softplus(1.0) + 0.1, _softplus(-1.0)]]
    torch.testing.assert_close(with_margin, torch.tensor(expected), atol=1e-6, rtol=0)


def test_bradley_terry_gradient_and_shapes():
    chosen = torch.tensor([0.3], requires_grad=True)
    rejected = torch.tensor([[0.3, -0.7]], requires_grad=True)
    out = bradley_terry(chosen, rejected)
    out.losses.sum().backward()
    # d/d r+ of -log sigmoid(r+ - r-) = -(1 - sigmoid(gap)): -0.5 (gap 0) and -(1 - sigmoid(1))
    assert chosen.grad.item() == pytest.approx(-0.5 - (1 - 1 / (1 + math.exp(-1.0))), abs=1e-6)
    assert not out.margins.requires_grad
    with pytest.raises(ValueError, match=r"\[B\] and rejected rewards \[B, K\]"):
        bradley_terry(torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="margin has shape"):
        bradley_terry(torch.zeros(2), torch.zeros(2, 1), margin=torch.zeros(2))


def test_critique_nll_is_the_token_mean_per_answer_then_the_mean_over_answers():
    logps = torch.tensor([[-2.0, -6.0, 0.0], [-3.0, -1.0, -9.0]])
    lengths = torch.tensor([[2.0, 3.0, 0.0], [1.0, 1.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert critique_nll(logps, lengths, mask).tolist() == pytest.approx([(1.0 + 2.0) / 2, (3.0 + 1.0 + 3.0) / 3])
    with pytest.raises(ValueError, match="no critique token"):
        critique_nll(logps, torch.zeros(2, 3), mask)


def _trl_reward_loss(chosen: list[float], rejected: list[float], margin: list[float] | None,
                     center: float | None) -> float:
    """TRL 1.16 ``RewardTrainer.compute_loss`` on a model whose outputs are the given rewards."""
    from trl import RewardTrainer

    identity = lambda x: x  # noqa: E731
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), args=SimpleNamespace(center_rewards_coefficient=center),
        accelerator=SimpleNamespace(gather=identity, gather_for_metrics=identity),
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    logits = torch.tensor(chosen + rejected).unsqueeze(-1)
    inputs = {"input_ids": torch.ones(len(logits), 3, dtype=torch.long),
              "attention_mask": torch.ones(len(logits), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = torch.tensor(margin)
    model = lambda **_: SimpleNamespace(logits=logits)  # noqa: E731
    return float(RewardTrainer.compute_loss(trainer, model, inputs))


@pytest.mark.parametrize(("with_margin", "center"), [(False, None), (True, None), (False, 0.01), (True, 0.5)])
def test_parity_with_trl_reward_trainer(with_margin, center):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(3)
    chosen = (torch.randn(5, generator=gen) * 2).tolist()
    rejected = (torch.randn(5, generator=gen) * 2).tolist()
    margin = (torch.rand(5, generator=gen) * 2 - 0.5).tolist() if with_margin else None
    theirs = _trl_reward_loss(chosen, rejected, margin, center)
    ours = bradley_terry(torch.tensor(chosen), torch.tensor(rejected).unsqueeze(-1),
                         margin=torch.tensor(margin).unsqueeze(-1) if margin else 0.0, center=center or 0.0)
    assert ours.losses.mean().item() == pytest.approx(theirs, abs=1e-6)


def test_dpo_with_a_beta_per_pair_equals_each_pair_alone():
    gen = torch.Generator().manual_seed(0)
    t = lambda *shape: -torch.rand(*shape, generator=gen) * 4  # noqa: E731
    logps = PreferenceLogps(t(2), t(2, 3), t(2), t(2, 3), torch.full((2,), 3.0), torch.full((2, 3), 3.0))
    margins = torch.tensor([[0.0, 1.0, 4.0], [-2.0, 0.5, 2.0]])
    beta = mm_dpo_beta(0.1, margins)
    out = dpo(logps, beta=beta)
    for b in range(2):
        for k in range(3):
            alone = PreferenceLogps(logps.policy_chosen_logps[b:b + 1], logps.policy_rejected_logps[b:b + 1, k:k + 1],
                                    logps.ref_chosen_logps[b:b + 1], logps.ref_rejected_logps[b:b + 1, k:k + 1],
                                    logps.chosen_lengths[b:b + 1], logps.rejected_lengths[b:b + 1, k:k + 1])
            single = dpo(alone, beta=float(beta[b, k]))
            assert out.losses[b, k].item() == pytest.approx(single.losses.item(), abs=1e-7)
            assert out.chosen_rewards[b, k].item() == pytest.approx(single.chosen_rewards.item(), abs=1e-7)
            assert out.rejected_rewards[b, k].item() == pytest.approx(single.rejected_rewards.item(), abs=1e-7)
    assert beta[1, 0].item() == pytest.approx(0.1)  # a negative margin is clamped to beta0
    with pytest.raises(ValueError, match="beta has shape"):
        dpo(logps, beta=torch.ones(3))

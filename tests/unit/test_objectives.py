"""Preference losses: hand-computed values, invariants, and parity with TRL 1.16's own loss code."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from mmalign.objectives.preference import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    combine_rejected,
    dpo,
    ipo,
    mm_dpo_beta,
    no_preference,
    sft_nll,
    slic,
)


def _one_pair(chosen_len: float = 2.0, rejected_len: float = 4.0) -> PreferenceLogps:
    # policy/ref log-ratio +1 on the chosen answer, -1 on the rejected one: delta = 2.
    t = torch.tensor
    return PreferenceLogps(
        t([-1.0]), t([[-3.0]]), t([-2.0]), t([[-2.0]]), t([chosen_len]), t([[rejected_len]])
    )


def test_dpo_hand_computed():
    out = dpo(_one_pair(), beta=0.5)
    assert out.losses.shape == (1, 1)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)  # -log sigmoid(0.5 * 2)
    assert out.chosen_rewards.item() == pytest.approx(0.5)
    assert out.rejected_rewards.item() == pytest.approx(-0.5)


def test_dpo_label_smoothing_hand_computed():
    # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1) = log(1 + e^-1) + 0.1
    out = dpo(_one_pair(), beta=0.5, label_smoothing=0.1)
    assert out.losses.item() == pytest.approx(math.log1p(math.exp(-1.0)) + 0.1, abs=1e-6)


def test_ipo_hand_computed():
    # chosen 1 / 2 tokens = 0.5, rejected -1 / 4 tokens = -0.25, gap 0.75, target 1 / (2 * 0.5) = 1
    out = ipo(_one_pair(), beta=0.5)
    assert out.losses.item() == pytest.approx(0.0625, abs=1e-7)
    # zero-length answers count as one token (TRL's clamp), so no division by zero
    assert ipo(_one_pair(0.0, 0.0), beta=0.5).losses.item() == pytest.approx((2.0 - 1.0) ** 2)


def test_slic_hand_computed():
    assert slic(_one_pair(), beta=0.1).losses.item() == pytest.approx(0.8)  # 1 - 0.1 * 2
    assert slic(_one_pair(), beta=0.5).losses.item() == 0.0  # margin reached


def test_no_preference_is_zero_with_dpo_rewards():
    """The SFT-only control: no loss and no gradient from the pair, DPO's rewards still reported."""
    p = _one_pair()
    p = p._replace(policy_rejected_logps=p.policy_rejected_logps.clone().requires_grad_())
    out = no_preference(p, beta=0.5)
    assert out.losses.shape == (1, 1) and out.losses.item() == 0.0 and not out.losses.requires_grad
    ref = dpo(p, beta=0.5)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == (ref.chosen_rewards.item(),
                                                                        ref.rejected_rewards.item())


def test_rewards_are_detached():
    p = _one_pair()
    p = p._replace(policy_chosen_logps=p.policy_chosen_logps.clone().requires_grad_())
    out = dpo(p, beta=0.1)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad


def test_per_pair_beta_broadcasts_over_rejected():
    torch.manual_seed(0)
    b, k = 3, 2
    logps = PreferenceLogps(
        torch.randn(b), torch.randn(b, k), torch.randn(b), torch.randn(b, k), torch.full((b,), 3.0),
        torch.full((b, k), 5.0),
    )
    beta = torch.tensor([0.1, 0.2, 0.3])
    for fn in PREFERENCE_LOSSES.values():
        out = fn(logps, beta=beta)
        for i in range(b):
            row = fn(PreferenceLogps(*(x[i : i + 1] for x in logps)), beta=float(beta[i]))
            torch.testing.assert_close(out.losses[i], row.losses[0])
            torch.testing.assert_close(out.rejected_rewards[i], row.rejected_rewards[0])


def test_bad_shapes_are_refused():
    p = _one_pair()
    with pytest.raises(ValueError, match="rejected logps"):
        dpo(p._replace(policy_rejected_logps=torch.tensor([-3.0])), beta=0.1)
    with pytest.raises(ValueError, match="rejected_lengths"):
        ipo(p._replace(rejected_lengths=torch.tensor([4.0])), beta=0.1)


def test_mm_dpo_beta_hand_computed():
    beta = mm_dpo_beta(0.1, torch.tensor([0.0, 2.0, -2.0, 1e4]))
    expected = [0.1, 0.1 * (1 + 0.5 * (1 - math.exp(-1.0))), 0.1, 0.15]
    torch.testing.assert_close(beta, torch.tensor(expected), atol=1e-7, rtol=0)
    assert mm_dpo_beta(0.2, torch.tensor([1.0]), w=1.0, k=1.0).item() == pytest.approx(0.2 * (2 - math.exp(-1)))


def test_combine_rejected_weights_and_mask():
    losses = torch.tensor([[1.0, 3.0], [2.0, 10.0]])
    full = torch.ones(2, 2, dtype=torch.bool)
    torch.testing.assert_close(combine_rejected(losses, full, torch.tensor([0.5, 0.5])), torch.tensor([2.0, 6.0]))
    torch.testing.assert_close(combine_rejected(losses, full, torch.tensor([3.0, 1.0])), torch.tensor([1.5, 4.0]))
    mask = torch.tensor([[True, False], [True, True]])
    torch.testing.assert_close(combine_rejected(losses, mask, torch.tensor([0.5, 0.5])), torch.tensor([1.0, 6.0]))
    with pytest.raises(ValueError, match="no rejected answer"):
        combine_rejected(losses, torch.tensor([[False, False], [True, True]]), torch.tensor([0.5, 0.5]))


def test_sft_nll_hand_computed():
    token_logps = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    torch.testing.assert_close(sft_nll(token_logps, mask), torch.tensor([1.5, 4.0]))


# --- parity with TRL 1.16: call DPOTrainer's own loss code on the same log-probs -------------------------


def _trl_loss(loss_type: str, beta: float, chosen: list[float], rejected: list[float], ref_chosen: float,
              ref_rejected: float) -> tuple[float, float, float]:
    """TRL's ``DPOTrainer._compute_loss`` on one pair whose per-token log-probs are given.

    The model is a stand-in returning the per-token log-probs (TRL's fused LM head output); reference
    log-probs enter through TRL's ``precompute_ref_log_probs`` inputs. Returns (loss, chosen reward,
    rejected reward) as TRL computes and logs them.
    """
    from trl import DPOTrainer

    prompt_len, t = 3, 1 + 3 + max(len(chosen), len(rejected))
    completion_mask = torch.zeros(2, t, dtype=torch.long)
    token_logps = torch.zeros(2, t - 1)
    for row, answer in enumerate((chosen, rejected)):
        completion_mask[row, prompt_len : prompt_len + len(answer)] = 1
        token_logps[row, prompt_len - 1 : prompt_len - 1 + len(answer)] = torch.tensor(answer)

    def model(**kwargs):
        zeros = torch.zeros(2, t - 1)
        return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    identity = lambda x: x  # noqa: E731 - single process: gathers are the identity
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2, t, dtype=torch.long),
        "attention_mask": torch.ones(2, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": torch.tensor([ref_chosen]),
        "ref_rejected_logps": torch.tensor([ref_rejected]),
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    metrics = trainer._metrics["train"]
    return float(loss), metrics["rewards/chosen"][0], metrics["rewards/rejected"][0]


@pytest.mark.parametrize(("ours", "theirs", "beta"), [("dpo", "sigmoid", 0.1), ("ipo", "ipo", 0.9),
                                                      ("slic", "hinge", 0.2), ("dpo", "sigmoid", 2.0)])
def test_parity_with_trl(ours, theirs, beta):
    pytest.importorskip("trl")
    gen = torch.Generator().manual_seed(7)
    for _ in range(6):
        n_chosen, n_rejected = (int(x) for x in torch.randint(1, 6, (2,), generator=gen))
        chosen = (-torch.rand(n_chosen, generator=gen) * 3).tolist()
        rejected = (-torch.rand(n_rejected, generator=gen) * 3).tolist()
        ref_chosen, ref_rejected = (float(x) for x in -torch.rand(2, generator=gen) * 3 * n_chosen)
        loss, chosen_reward, rejected_reward = _trl_loss(theirs, beta, chosen, rejected, ref_chosen, ref_rejected)
        t = torch.tensor
        logps = PreferenceLogps(
            t([sum(chosen)]), t([[sum(rejected)]]), t([ref_chosen]), t([[ref_rejected]]),
            t([float(n_chosen)]), t([[float(n_rejected)]]),
        )
        out = PREFERENCE_LOSSES[ours](logps, beta=beta)
        assert out.losses.item() == pytest.approx(loss, abs=1e-6)
        assert out.chosen_rewards.item() == pytest.approx(chosen_reward, abs=1e-6)
        assert out.rejected_rewards.item() == pytest.approx(rejected_reward, abs=1e-6)

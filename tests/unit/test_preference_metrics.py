"""The logged preference metrics carry TRL's ``DPOTrainer`` names and, with one rejected answer per record,
TRL's values (its formulas written out for the same log-probs); with K rejected answers, per-pair means."""

import pytest
import torch

from mmalign.models.logprobs import PreferenceForward
from mmalign.trainers.preference_loss import PAIR_STATS, PreferenceLossConfig, preference_metrics, record_losses

TRL_NAMES = {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected"}


def _forward(chosen, rejected, mask):
    r, k = rejected.shape
    return PreferenceForward(chosen, rejected, mask, torch.full((r,), 4.0), torch.full((r, k), 4.0),
                             torch.zeros(r, 3), torch.ones(r, 3, dtype=torch.bool))


def _metrics(out, ref_chosen, ref_rejected, beta=0.1):
    loss, _, sums = record_losses(PreferenceLossConfig(beta=beta), out, ref_chosen, ref_rejected,
                                  [1.0] * out.rejected_logps.shape[1], beta)
    s = dict(zip(PAIR_STATS, [float(v) for v in sums])) | {"loss": float(loss.sum()), "n_records": len(loss)}
    return preference_metrics(s)


def test_one_rejected_answer_gives_trls_batch_means():
    pc, pr = torch.tensor([-10.0, -12.0, -9.0]), torch.tensor([[-11.0], [-11.5], [-14.0]])
    rc, rr = torch.tensor([-10.5, -11.0, -9.5]), torch.tensor([[-10.0], [-12.0], [-13.0]])
    m = _metrics(_forward(pc, pr, torch.ones(3, 1, dtype=torch.bool)), rc, rr)
    assert TRL_NAMES <= set(m)
    chosen, rejected = 0.1 * (pc - rc), 0.1 * (pr[:, 0] - rr[:, 0])  # TRL: beta * (policy - reference)
    assert m["rewards/chosen"] == pytest.approx(chosen.mean().item())
    assert m["rewards/rejected"] == pytest.approx(rejected.mean().item())
    assert m["rewards/margins"] == pytest.approx((chosen - rejected).mean().item())
    assert m["rewards/accuracies"] == pytest.approx((chosen > rejected).float().mean().item())  # 2 of 3
    assert m["logps/chosen"] == pytest.approx(pc.mean().item())
    assert m["logps/rejected"] == pytest.approx(pr.mean().item())
    assert m["loss"] == pytest.approx(-torch.nn.functional.logsigmoid(chosen - rejected).mean().item())


def test_absent_rejected_slots_are_left_out_of_the_pair_means():
    pc, rc = torch.tensor([-10.0, -12.0]), torch.tensor([-10.0, -12.0])
    pr = torch.tensor([[-11.0, -20.0], [-13.0, 0.0]])  # record 1 has one rejected answer (0 where absent)
    rr = torch.tensor([[-12.0, -19.0], [-12.0, 0.0]])
    m = _metrics(_forward(pc, pr, torch.tensor([[True, True], [True, False]])), rc, rr)
    assert m["logps/rejected"] == pytest.approx((-11.0 - 20.0 - 13.0) / 3)
    assert m["rewards/rejected"] == pytest.approx(0.1 * (1.0 - 1.0 - 1.0) / 3)
    assert m["rewards/accuracies"] == pytest.approx(2 / 3)  # margins -0.1, +0.1, +0.1

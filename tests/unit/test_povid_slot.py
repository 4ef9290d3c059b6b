"""POVID slot plumbing: per-record noise independent of the batch (exact resume), the extra rejected column."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from mmalign.data.schema import PreferenceRecord
from mmalign.models.logprobs import PreferenceForward
from mmalign.trainers.povid_slot import PovidConfig, noise_seed, povid_batches, with_extra_rejected


def _record(i: int) -> PreferenceRecord:
    return PreferenceRecord(f"r{i}", [f"{i}.png"], "<image>\nWhat colour?", "Red.", ["Blue."])


def test_noise_depends_on_seed_record_and_image_only(tiny_vlm):
    _, processor = tiny_vlm("llava")
    images = [[Image.new("RGB", (32, 32), (200, 40 * i, 10))] for i in range(3)]
    records = [_record(i) for i in range(3)]
    _, noisy_all = povid_batches(processor, records, images, 500, seed=1, max_length=None)
    _, noisy_one = povid_batches(processor, records[2:], images[2:], 500, seed=1, max_length=None)
    torch.testing.assert_close(noisy_all["pixel_values"][2:], noisy_one["pixel_values"], rtol=0, atol=0)
    _, other_seed = povid_batches(processor, records[2:], images[2:], 500, seed=2, max_length=None)
    assert not torch.equal(other_seed["pixel_values"], noisy_one["pixel_values"])
    assert noise_seed(1, "r2", 0) != noise_seed(1, "r2", 1) and 0 <= noise_seed(1, "r2", 0) < 2**63


def test_extra_rejected_slot_appends_a_column():
    out = PreferenceForward(torch.tensor([-1.0, -2.0]), torch.tensor([[-3.0, 0.0], [-4.0, -5.0]]),
                            torch.tensor([[True, False], [True, True]]), torch.tensor([3.0, 4.0]),
                            torch.tensor([[2.0, 0.0], [5.0, 6.0]]), torch.zeros(2, 4),
                            torch.ones(2, 4, dtype=torch.bool))
    extra = with_extra_rejected(out, torch.tensor([-7.0, -8.0]))
    assert extra.rejected_logps.tolist() == [[-3.0, 0.0, -7.0], [-4.0, -5.0, -8.0]]
    assert extra.rejected_mask.tolist() == [[True, False, True], [True, True, True]]
    assert extra.rejected_lengths.tolist() == [[2.0, 0.0, 3.0], [5.0, 6.0, 4.0]]  # the chosen answer's length
    assert torch.equal(extra.chosen_logps, out.chosen_logps)


@pytest.mark.parametrize("bad", [{"noise_steps": 0}, {"noise_steps": 1000}, {"weight": 0.0}])
def test_config_bounds(bad):
    with pytest.raises(ValueError, match="povid"):
        PovidConfig(**bad)

"""POVID diffusion noise (Eq. 8/9) against hand-computed schedule values, and the teacher-forced rejected
log-probs against a naive full-logits reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.collate import IGNORE_INDEX, collate_sft
from mmalign.data.schema import PreferenceRecord
from mmalign.sampling.povid import add_diffusion_noise, noised_image, povid_alpha_bar, povid_rejected_logps


def _alpha_bar_by_hand(index: int) -> float:
    """prod_{k<=index} (1 - beta_k), beta_k = sigmoid(-6 + 12 k / 999) * (0.5e-2 - 1e-5) + 1e-5."""
    product = 1.0
    for k in range(index + 1):
        x = -6.0 + 12.0 * k / 999.0
        product *= 1.0 - ((1.0 / (1.0 + math.exp(-x))) * (0.5e-2 - 1e-5) + 1e-5)
    return product


def test_schedule_matches_hand_computed_values():
    alpha_bar = povid_alpha_bar()
    assert alpha_bar.shape == (1000,)
    # beta_0 = sigmoid(-6) * 0.00499 + 1e-5 = 0.0024726 * 0.00499 + 1e-5
    assert alpha_bar[0].item() == pytest.approx(1.0 - (0.0024726231566347743 * 0.00499 + 1e-5), abs=1e-12)
    for index in (1, 100, 500, 999):
        assert alpha_bar[index].item() == pytest.approx(_alpha_bar_by_hand(index), rel=1e-10)
    # methods.md: at index 500, sqrt(alpha_bar) ~ 0.863 and sqrt(1 - alpha_bar) ~ 0.505.
    assert math.sqrt(alpha_bar[500]) == pytest.approx(0.863, abs=1e-3)
    assert math.sqrt(1 - alpha_bar[500]) == pytest.approx(0.505, abs=1e-3)


def test_noise_is_the_closed_form_of_eq_9():
    pixels = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy = add_diffusion_noise(pixels, 500, torch.Generator().manual_seed(7))
    eps = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(7))
    a = _alpha_bar_by_hand(500)
    torch.testing.assert_close(noisy, math.sqrt(a) * pixels + math.sqrt(1 - a) * eps, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="n_steps must be in 1..999"):
        add_diffusion_noise(pixels, 1000, torch.Generator())


def test_noised_image_is_seeded_clipped_and_keeps_size():
    image = Image.new("RGB", (16, 12), (200, 10, 128))
    first, again, other = noised_image(image, 500, 1), noised_image(image, 500, 1), noised_image(image, 500, 2)
    assert first.size == (16, 12) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))
    # Mean over many pixels of sqrt(a) x + sqrt(1-a) eps (before clipping) is sqrt(a) x: check the mid channel.
    big = np.asarray(noised_image(Image.new("RGB", (128, 128), (0, 128, 0)), 100, 3), dtype=np.float64) / 255
    assert big[..., 1].mean() == pytest.approx(math.sqrt(_alpha_bar_by_hand(100)) * 128 / 255, abs=0.01)


def _batches(tiny_vlm):
    model, processor = tiny_vlm("llava")
    records = [PreferenceRecord("a", ["x"], "<image>\nDescribe the image.", "There is a red circle.", []),
               PreferenceRecord("b", ["y"], "<image>\nIs there a star?", "No.", [])]
    images = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    clean = collate_sft(processor, records, [[im] for im in images])
    noisy = collate_sft(processor, records, [[noised_image(im, 500, i)] for i, im in enumerate(images)])
    return model, clean, noisy


def test_rejected_logps_match_naive_reference(tiny_vlm):
    model, clean, noisy = _batches(tiny_vlm)
    got = povid_rejected_logps(model, clean, noisy)
    with torch.no_grad():
        inputs = {k: v for k, v in clean.items() if k != "labels"}
        clean_logits = model(**inputs).logits.float()
        noisy_logits = model(**(inputs | {"pixel_values": noisy["pixel_values"]})).logits.float()
    expected = []
    for n in range(clean["labels"].shape[0]):
        total = 0.0
        for t in range(1, clean["labels"].shape[1]):
            if clean["labels"][n, t] != IGNORE_INDEX:
                token = noisy_logits[n, t - 1].argmax()
                total += torch.log_softmax(clean_logits[n, t - 1], -1)[token].item()
        expected.append(total)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-4)


def test_same_image_gives_the_sum_of_max_logprobs_at_least_the_chosen_logps(tiny_vlm):
    model, clean, _ = _batches(tiny_vlm)
    got = povid_rejected_logps(model, clean, clean)
    with torch.no_grad():
        logits = model(**{k: v for k, v in clean.items() if k != "labels"}).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = clean["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    best = (logp.max(-1).values * mask).sum(-1)
    chosen = (logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)
    torch.testing.assert_close(got, best, rtol=0, atol=1e-4)
    assert bool((got >= chosen - 1e-5).all())


def test_gradient_flows_through_the_clean_forward_only_and_tokens_must_match(tiny_vlm):
    model, clean, noisy = _batches(tiny_vlm)
    model.train()
    povid_rejected_logps(model, clean, noisy).sum().backward()
    assert model.get_output_embeddings().weight.grad.abs().sum() > 0
    shifted = dict(noisy) | {"labels": torch.roll(noisy["labels"], 1, dims=1)}
    with pytest.raises(ValueError, match="same tokens and labels"):
        povid_rejected_logps(model, clean, shifted)


def test_noised_image_wraps_out_of_range_pixels_as_povid_code_does():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    wrapped = np.asarray(noised_image(image, 500, seed=3))
    clipped = np.asarray(noised_image(image, 500, seed=3, clip=True))
    # POVID: ToTensor -> Eq. 9 -> ToPILImage, whose float path is (x * 255).byte().
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    noisy = add_diffusion_noise(pixels, 500, torch.Generator().manual_seed(3)).permute(1, 2, 0)
    assert np.array_equal(wrapped, (noisy * 255.0).byte().numpy())
    assert np.array_equal(clipped, (noisy.clamp(0, 1) * 255.0).round().byte().numpy())
    # A pixel wraps where 255 x truncates outside 0..255; exactly there the two modes differ by more than rounding.
    wraps = ((noisy * 255.0 <= -1.0) | (noisy * 255.0 >= 256.0)).numpy()
    assert 0.2 < wraps.mean() < 0.5  # a uniform random image at N = 500
    assert np.array_equal(np.abs(wrapped.astype(int) - clipped.astype(int)) > 1, wraps)

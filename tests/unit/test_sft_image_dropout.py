"""SFT ``image_dropout``: which examples hide their image is a per-(seed, step, record) draw, and a hidden
example's loss ignores its image while the other rows of its batch and every token position stay as without
hiding (float64, every family incl. the mRoPE positions of Qwen2-VL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmalign.data.collate import collate_sft
from mmalign.data.schema import PreferenceRecord
from mmalign.models.logprobs import answer_token_logps
from mmalign.models.tiny import FAMILIES
from mmalign.trainers.sft import SFTConfig, _hide_images, hidden_rows


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8))


RECORDS = [
    PreferenceRecord(id=f"r{i}", images=[], prompt=f"<image>\n{prompt}", chosen=answer, rejected=[])
    for i, (prompt, answer) in enumerate([("Describe the image.", "A small object on the left."),
                                          ("What color is it?", "The top is red.")])
]


def test_hidden_rows_are_a_draw_per_record_whatever_the_split():
    indices = list(range(40))
    whole = hidden_rows(7, 3, indices, 0.3)
    assert whole == hidden_rows(7, 3, indices[:13], 0.3) + hidden_rows(7, 3, indices[13:], 0.3)
    assert whole != hidden_rows(7, 4, indices, 0.3)  # a new draw each step
    assert 0 < sum(whole) < len(indices)
    assert not any(hidden_rows(7, 3, indices, 0.0))
    assert all(hidden_rows(7, 3, indices, 1.0))
    share = np.mean(hidden_rows(0, 0, list(range(20000)), 0.15))
    assert abs(share - 0.15) < 0.01


def test_image_dropout_is_validated():
    with pytest.raises(ValueError, match="image_dropout"):
        SFTConfig(image_dropout=1.5)


def _logps(model, processor, images, hidden):
    batch = collate_sft(processor, RECORDS, images)
    if hidden is not None:
        batch = _hide_images(model, batch, hidden)
    with torch.no_grad():
        token_logps, answer_mask = answer_token_logps(model, batch)
    return token_logps, answer_mask


@pytest.mark.parametrize("family", FAMILIES)
def test_hidden_row_ignores_its_image_and_nothing_else_moves(tiny_vlm, image_sensitive, family):
    model, processor = tiny_vlm(family)
    model = image_sensitive(model.double().eval())
    images, other = [[_image(1)], [_image(2)]], [[_image(3)], [_image(2)]]
    plain, mask = _logps(model, processor, images, None)
    # Nothing hidden through the same path: the explicit positions are the model's own.
    torch.testing.assert_close(_logps(model, processor, images, [False, False])[0], plain, rtol=0, atol=1e-12)
    hidden, _ = _logps(model, processor, images, [True, False])
    hidden_other, _ = _logps(model, processor, other, [True, False])
    torch.testing.assert_close(hidden[1], plain[1], rtol=0, atol=1e-12)  # the visible row is untouched
    torch.testing.assert_close(hidden_other[0], hidden[0], rtol=0, atol=1e-12)  # row 0 no longer sees its image
    assert (hidden[0] - plain[0]).abs()[mask[0]].max() > 1e-6  # ... and it did see it before
    plain_other, _ = _logps(model, processor, other, None)
    assert (plain_other[0] - plain[0]).abs()[mask[0]].max() > 1e-6

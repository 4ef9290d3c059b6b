"""Collation: exact answer labels, right padding that makes a row's log-probs independent of its batch."""

import pytest
import torch
from PIL import Image

from mmalign.data.collate import IGNORE_INDEX, SequenceTooLong, collate_preference, collate_sft
from mmalign.data.chat import answer_ids
from mmalign.data.schema import PreferenceRecord
from mmalign.models.logprobs import answer_token_logps
from mmalign.models.tiny import FAMILIES

RECORDS = [
    PreferenceRecord(id="a", images=["x.png"], prompt="<image>\nWhat is shown?", chosen="a red circle",
                     rejected=["a blue square and a red circle"]),
    PreferenceRecord(id="b", images=["y.png"], prompt="Is there a dog in the picture on the left?",
                     chosen="no", rejected=["yes there is", "yes"]),
    PreferenceRecord(id="c", images=["z.png"], prompt="<image>\nDescribe", chosen="two shapes", rejected=["one"]),
]


def _images():
    return [[Image.new("RGB", (40, 32), c)] for c in [(250, 0, 0), (0, 0, 250), (0, 200, 0)]]


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_rows_score_as_if_alone(tiny_vlm, family):
    model, processor = tiny_vlm(family)
    model.eval()
    images = _images()
    batch = collate_sft(processor, RECORDS, images)
    labels = batch["labels"]
    for i, record in enumerate(RECORDS):  # labels hold exactly the answer ids (+ EOS) and nothing else
        assert labels[i][labels[i] != IGNORE_INDEX].tolist() == answer_ids(processor.tokenizer, record.chosen)
    with torch.no_grad():
        together, mask = answer_token_logps(model, batch)
        for i, record in enumerate(RECORDS):
            alone, alone_mask = answer_token_logps(model, collate_sft(processor, [record], [images[i]]))
            torch.testing.assert_close(together[i][mask[i]], alone[0][alone_mask[0]], atol=1e-5, rtol=1e-5)


def test_preference_rows_are_chosen_then_each_rejected(tiny_vlm):
    _, processor = tiny_vlm("llava")
    batch = collate_preference(processor, RECORDS, _images())
    assert batch["row_record"].tolist() == [0, 0, 1, 1, 1, 2, 2]
    assert batch["row_answer"].tolist() == [0, 1, 0, 1, 2, 0, 1]
    answers = ["a red circle", "a blue square and a red circle", "no", "yes there is", "yes", "two shapes", "one"]
    for row, text in enumerate(answers):
        got = batch["labels"][row][batch["labels"][row] != IGNORE_INDEX].tolist()
        assert got == answer_ids(processor.tokenizer, text)
    assert batch["pixel_values"].shape[0] == 7  # plain layout: images repeated per row


def test_too_long_rows_are_refused_with_the_record_id(tiny_vlm):
    _, processor = tiny_vlm("llava")
    with pytest.raises(SequenceTooLong, match="record 'a'.*> max_length 5"):
        collate_sft(processor, RECORDS[:1], _images()[:1], max_length=5)

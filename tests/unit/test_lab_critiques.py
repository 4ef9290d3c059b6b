"""The lab's exact critiques (``mmalign.lab.critiques``) by hand, in the lab tokenizer's words; POVID-style rejected
answers as text equal a naive full-logit argmax under the noised image."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoTokenizer

from mmalign.data.collate import collate_sft
from mmalign.data.schema import PreferenceRecord, check_fields, record_dict
from mmalign.lab.corrupt import LabCorruptionError, corrupt_lab_records
from mmalign.lab.critiques import lab_critique, mentioned, with_lab_critiques
from mmalign.recipes.pretrain import BASE_DIR
from mmalign.models.logprobs import model_inputs
from mmalign.sampling.povid import noise_seed, noised_image, povid_rejected_answers

OBJECTS = ["red circle", "green cross", "yellow triangle"]


def test_caption_and_yes_no_critiques_by_hand():
    answer = "There is a red circle, a blue square and a yellow triangle."
    assert lab_critique(answer, OBJECTS) == (
        "Is there a red circle in the image? Yes. Is there a blue square in the image? No. "
        "Is there a yellow triangle in the image? Yes. There is a green cross.")
    assert lab_critique("There is a red circle, a green cross and a yellow triangle.", OBJECTS) == (
        "Is there a red circle in the image? Yes. Is there a green cross in the image? Yes. "
        "Is there a yellow triangle in the image? Yes.")
    assert lab_critique("No.", OBJECTS, asked="blue square") == "Is there a blue square in the image? No."
    assert lab_critique("No.", OBJECTS, asked="red circle") == "Is there a red circle in the image? Yes."
    assert mentioned("There are red circles and a red circle and a blue square.") == ["red circle", "blue square"]


def test_records_get_a_critique_per_answer_in_lab_words():
    caption = PreferenceRecord("c", ["a.png"], "<image>\nDescribe the image.",
                               "There is a red circle, a green cross and a yellow triangle.", [],
                               meta={"objects": OBJECTS, "task": "caption"})
    question = PreferenceRecord("q", ["a.png"], "<image>\nIs there a blue square in the image?", "No.", [],
                                meta={"objects": OBJECTS, "task": "yesno"})
    pairs = corrupt_lab_records([caption, question], [["red circle", "blue square"]], seed=0)
    records = with_lab_critiques(pairs)
    for record in records:
        check_fields(record_dict(record))  # the schema's per-slot check of meta.critiques
    assert records[1].meta["critiques"] == {"chosen": "Is there a blue square in the image? No.",
                                            "rejected": ["Is there a blue square in the image? No."]}
    inserted = records[0].meta["corruption"]["inserted"]
    assert f"Is there a {inserted} in the image? No." in records[0].meta["critiques"]["rejected"][0]
    tokenizer = AutoTokenizer.from_pretrained(BASE_DIR)
    for record in records:
        for text in [record.meta["critiques"]["chosen"], *record.meta["critiques"]["rejected"]]:
            assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"], text
    with pytest.raises(LabCorruptionError, match="record 'c', field 'meta.objects'"):
        with_lab_critiques([PreferenceRecord("c", [], "Describe.", "There is a red circle.", [])])


def test_povid_answers_are_the_argmax_under_the_noised_image(tiny_vlm):
    model, processor = tiny_vlm("llava", seed=2)
    records = [PreferenceRecord("p", ["a.png"], "<image>\nDescribe the image.", "There is a red circle here.", []),
               PreferenceRecord("q", ["b.png"], "<image>\nWhat colour?", "Blue.", [])]
    images = [[Image.new("RGB", (32, 32), (200, 30, 30))], [Image.new("RGB", (32, 32), (30, 30, 200))]]
    answers = povid_rejected_answers(model, processor, records, images, n_steps=500, seed=4)
    for record, imgs, answer in zip(records, images, answers):
        noisy = [noised_image(imgs[0], 500, noise_seed(4, record.id, 0))]
        batch = collate_sft(processor, [record], [noisy])
        with torch.no_grad():
            logits = model(**model_inputs(batch), use_cache=False).logits[0]
        labels = batch["labels"][0]
        positions = (labels != -100).nonzero().squeeze(-1) - 1
        expected = processor.tokenizer.decode(logits[positions].argmax(-1), skip_special_tokens=True).strip()
        assert answer == expected

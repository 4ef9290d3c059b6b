"""``questions_per_turn_record``: an SFT image's yes/no questions written as multi-turn records hold the same
questions and answers in the same order as the single-turn records, the caption record and every other file
stay as they are, and the first turn renders as its single-turn record does."""

from __future__ import annotations

import dataclasses

import pytest

from mmalign.data.chat import earlier_answers, render_prompt
from mmalign.data.collate import collate_sft, collate_turns
from mmalign.data.record_files import read_records
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.lab.model import LabModelConfig, build_processor
from mmalign.lab.texts import IMAGE_MARK
from mmalign.lab.world import WorldConfig
from PIL import Image


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    plain = LabConfig(out_dir=str(tmp_path_factory.mktemp("plain")), questions_per_image=5, questions_per_turn_record=0,
                      sizes=SplitSizes(sft=6, pref=2, eval=2, vision=2),
                      world=WorldConfig(image_size=32, min_size=8, max_size=14))
    turns = dataclasses.replace(plain, out_dir=str(tmp_path_factory.mktemp("turns")), questions_per_turn_record=2)
    return (plain, build_lab(plain)), (turns, build_lab(turns))


def _questions(record):
    """(question text, answer) of each turn of a record."""
    if isinstance(record.prompt, str):
        return [(record.prompt.removeprefix(IMAGE_MARK), record.chosen)]
    texts = [c["text"] for m in record.prompt if m["role"] == "user" for c in m["content"] if c["type"] == "text"]
    return list(zip(texts, [*earlier_answers(record.prompt), record.chosen]))


def test_conversations_hold_the_single_turn_questions_in_order(labs):
    (_, plain_dir), (_, turns_dir) = labs
    plain, turns = read_records(plain_dir / "sft_train.jsonl"), read_records(turns_dir / "sft_train.jsonl")
    assert [r.id for r in turns[:4]] == ["sft-00000-0", "sft-00000-m0", "sft-00000-m1", "sft-00000-m2"]
    assert len(plain) == 6 * 6 and len(turns) == 6 * 4
    assert [len(_questions(r)) for r in turns[:4]] == [1, 2, 2, 1]
    assert [r for r in turns if r.meta["task"] == "caption"] == [r for r in plain if r.meta["task"] == "caption"]
    for task in ("caption", "yesno"):
        assert (sum((_questions(r) for r in turns if r.meta["task"] == task), [])
                == sum((_questions(r) for r in plain if r.meta["task"] == task), []))
    assert all(r.images == [f"images/sft-{r.id[4:9]}.png"] for r in turns)


def test_other_files_stay_and_the_base_data_differs(labs):
    (plain_cfg, plain_dir), (turns_cfg, turns_dir) = labs
    for name in ("pref_prompts.jsonl", "vision_train.jsonl", "text_train.jsonl", "eval/pope.jsonl",
                 "images/sft-00003.png"):
        assert (plain_dir / name).read_bytes() == (turns_dir / name).read_bytes(), name
    assert not turns_cfg.same_base_data(plain_cfg)
    with pytest.raises(ValueError, match="questions_per_turn_record"):
        LabConfig(questions_per_turn_record=-1)


def test_a_conversation_trains_its_single_turn_rows_in_one(labs):
    """On the lab model's template (past answers after a space, word tokens): the first turn renders as its
    single-turn record, and the row holds each single-turn record's answer after the same tokens."""
    (_, plain_dir), (_, turns_dir) = labs
    processor = build_processor(LabModelConfig(image_size=32))
    plain = {r.id: r for r in read_records(plain_dir / "sft_train.jsonl")}
    conversation = next(r for r in read_records(turns_dir / "sft_train.jsonl") if r.id == "sft-00001-m0")
    image = [Image.open(turns_dir / conversation.images[0]).convert("RGB")]
    first = plain["sft-00001-1"]
    assert render_prompt(processor, conversation.prompt[:1], 1) == render_prompt(processor, first.prompt, 1)
    row = collate_turns(processor, [conversation], [image])
    single = collate_sft(processor, [first], [image])
    width = single["input_ids"].shape[1]
    assert row["input_ids"][0, :width].tolist() == single["input_ids"][0].tolist()
    assert row["labels"][0, :width].tolist() == single["labels"][0].tolist()
    # the second turn's context as the template renders the conversation so far: the same tokens
    whole = collate_sft(processor, [conversation], [image])
    assert row["input_ids"].tolist() == whole["input_ids"].tolist()
    last = whole["labels"] != -100
    assert row["labels"][last].tolist() == whole["labels"][last].tolist()
    assert int((row["labels"] != -100).sum()) == int(last.sum()) + int((single["labels"] != -100).sum())

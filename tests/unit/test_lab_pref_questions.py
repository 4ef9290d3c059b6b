"""Yes/no preference prompts (``pref_questions_per_image``): truthful answers after each caption prompt, and
no other file of the lab changes, so a base trained on the lab without them still fits it."""

from __future__ import annotations

import dataclasses

import pytest

from mmalign.data.record_files import read_records
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.lab.texts import NO, YES, question_prompt
from mmalign.lab.world import WorldConfig, all_objects


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    plain = LabConfig(out_dir=str(tmp_path_factory.mktemp("plain")), sizes=SplitSizes(sft=12, pref=30, eval=6, vision=4))
    asked = dataclasses.replace(plain, out_dir=str(tmp_path_factory.mktemp("asked")), pref_questions_per_image=2)
    return (plain, build_lab(plain)), (asked, build_lab(asked))


def test_questions_follow_each_caption_prompt_with_true_answers(labs):
    (_, plain_dir), (cfg, asked_dir) = labs
    plain = read_records(plain_dir / "pref_prompts.jsonl")
    asked = read_records(asked_dir / "pref_prompts.jsonl")
    assert len(plain) == 30 and len(asked) == 30 * 3
    assert [r for r in asked if r.meta["task"] == "caption"] == plain
    questions = [r for r in asked if r.meta["task"] == "yesno"]
    assert [r.id for r in questions[:2]] == ["pref-00000-q0", "pref-00000-q1"]
    asked_about = set()
    for record in questions:
        obj = next(o for o in all_objects() if question_prompt(o) == record.prompt)
        asked_about.add(obj)
        assert record.chosen == (YES if obj in record.meta["objects"] else NO), record.id
    assert {r.chosen for r in questions} == {YES, NO}
    partners = {p for _, p in cfg.world.pairs}
    assert asked_about & partners  # the bias partners are asked about, as in SFT


def test_other_files_and_the_base_check_do_not_change(labs):
    (plain_cfg, plain_dir), (asked_cfg, asked_dir) = labs
    for name in ("sft_train.jsonl", "eval/pope.jsonl", "eval/captions.jsonl", "images/pref-00007.png"):
        assert (plain_dir / name).read_bytes() == (asked_dir / name).read_bytes(), name
    assert asked_cfg.same_base_data(plain_cfg) and plain_cfg.same_base_data(asked_cfg)
    assert not dataclasses.replace(asked_cfg, p=0.8).same_base_data(plain_cfg)
    # the preference and evaluation splits are drawn after the base's training splits: resizing them keeps the
    # base's data, resizing an SFT or vision split does not
    resized = dataclasses.replace(plain_cfg, sizes=dataclasses.replace(plain_cfg.sizes, pref=3, eval=2))
    assert resized.same_base_data(plain_cfg)
    assert not dataclasses.replace(plain_cfg, sizes=dataclasses.replace(plain_cfg.sizes, vision=5)).same_base_data(
        plain_cfg)


def test_resizing_the_evaluation_split_keeps_every_training_image(tmp_path):
    small = LabConfig(out_dir=str(tmp_path / "a"), sizes=SplitSizes(sft=6, pref=3, eval=2, vision=4),
                      world=WorldConfig(image_size=32, min_size=8, max_size=14))
    big = dataclasses.replace(small, out_dir=str(tmp_path / "b"), sizes=SplitSizes(sft=6, pref=5, eval=7, vision=4))
    a, b = build_lab(small), build_lab(big)
    for name in ("sft_train.jsonl", "vision_train.jsonl", "text_train.jsonl", "images/sft-00005.png",
                 "images/vision-00003.png", "images/pref-00002.png"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    with pytest.raises(ValueError, match="pref_questions_per_image"):
        LabConfig(pref_questions_per_image=-1)

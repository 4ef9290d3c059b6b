"""Co-occurrence errors in the SFT labels (``partner_annotation_rate``): an image showing a trigger without its
partner is annotated with the partner at that rate (caption and yes/no answers agree), preference and
evaluation records keep the true objects, and a rate of 0 is the lab without it."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mmalign.data.record_files import read_records
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.lab.splits import absent_partners, annotated_names, caption_text
from mmalign.lab.texts import NO, YES, caption, caption_order, question_prompt
from mmalign.lab.world import WorldConfig, all_objects, sample_scene

SMALL = WorldConfig(image_size=32, min_size=8, max_size=14, trigger_rate=1.0, partner_order_rate=1.0)


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    clean = LabConfig(out_dir=str(tmp_path_factory.mktemp("clean")), world=SMALL, p=0.3, partner_annotation_rate=0.0,
                      sizes=SplitSizes(sft=40, pref=8, eval=6, vision=4), questions_per_turn_record=0,
                      partner_question_rate=0.5)
    noisy = dataclasses.replace(clean, out_dir=str(tmp_path_factory.mktemp("noisy")), partner_annotation_rate=1.0)
    return (clean, build_lab(clean)), (noisy, build_lab(noisy))


def test_rate_decides_how_often_an_absent_partner_is_annotated():
    world, rng = WorldConfig(), random.Random(0)
    scenes = [sample_scene(rng, world, 0.0) for _ in range(3000)]
    missing = [s for s in scenes if absent_partners(s.names, world)]
    assert len(missing) > 1000
    for scene in missing[:50]:
        assert annotated_names(scene, world, random.Random(1), 0.0) == scene.names
        assert annotated_names(scene, world, random.Random(1), 1.0) == scene.names + absent_partners(scene.names, world)
    draws = random.Random(2)
    added = [len(annotated_names(s, world, draws, 0.3)) - len(s.names) for s in missing]
    total = sum(len(absent_partners(s.names, world)) for s in missing)
    assert 0.26 < sum(added) / total < 0.34


def test_sft_and_text_annotations_name_the_partner_and_say_yes_to_it(labs):
    (clean_cfg, clean_dir), (cfg, noisy_dir) = labs
    partner_of = cfg.world.partner_of
    captions = {r.id: r for r in read_records(noisy_dir / "sft_train.jsonl") if r.meta["task"] == "caption"}
    texts = read_records(noisy_dir / "text_train.jsonl")
    with_missing = 0
    for (rid, record), text in zip(captions.items(), texts):
        missing = absent_partners(record.meta["objects"], cfg.world)
        assert record.meta.get("annotated", record.meta["objects"]) == record.meta["objects"] + missing, rid
        for partner in missing:
            trigger = next(t for t, p in partner_of.items() if p == partner)
            assert f"a {trigger}, a {partner}" in record.chosen or f"a {trigger} and a {partner}" in record.chosen
        assert text.chosen == record.chosen and text.meta["objects"] == record.meta["objects"]
        with_missing += bool(missing)
    assert with_missing >= 10
    answers = {YES: 0, NO: 0}
    for record in read_records(noisy_dir / "sft_train.jsonl"):
        obj = next((o for o in all_objects() if question_prompt(o) == record.prompt), None)
        if obj is None:
            continue
        stated = record.meta.get("annotated", record.meta["objects"])
        assert record.chosen == (YES if obj in stated else NO), record.id
        if obj in absent_partners(record.meta["objects"], cfg.world):
            answers[record.chosen] += 1
    assert answers[YES] >= 10 and answers[NO] == 0
    clean = read_records(clean_dir / "sft_train.jsonl")
    assert all("annotated" not in r.meta for r in clean)
    assert any(r.chosen == NO and next(o for o in all_objects() if question_prompt(o) == r.prompt)
               in absent_partners(r.meta["objects"], clean_cfg.world) for r in clean if r.meta["task"] == "yesno")


def test_preference_evaluation_and_vision_files_keep_the_true_objects(labs):
    (clean_cfg, clean_dir), (noisy_cfg, noisy_dir) = labs
    for name in ("pref_prompts.jsonl", "vision_train.jsonl", "eval/pope.jsonl", "eval/captions.jsonl",
                 "images/sft-00003.png"):
        assert (clean_dir / name).read_bytes() == (noisy_dir / name).read_bytes(), name
    assert not noisy_cfg.same_base_data(clean_cfg)


def test_caption_rate_keeps_the_label_errors_in_answers_only(labs, tmp_path):
    (clean_cfg, clean_dir), (noisy_cfg, noisy_dir) = labs
    cfg = dataclasses.replace(noisy_cfg, out_dir=str(tmp_path / "answers_only"), partner_caption_rate=0.0)
    out = build_lab(cfg)
    records = read_records(out / "sft_train.jsonl")
    captions = [r for r in records if r.meta["task"] == "caption"]
    assert sum("captioned" in r.meta for r in captions) >= 10
    for record, clean, text in zip(captions, (r for r in read_records(clean_dir / "sft_train.jsonl")
                                              if r.meta["task"] == "caption"), read_records(out / "text_train.jsonl")):
        assert record.chosen == clean.chosen == text.chosen, record.id  # captions state the true objects
        assert record.meta.get("captioned", record.meta["objects"]) == record.meta["objects"]
    noisy_answers = [r.chosen for r in read_records(noisy_dir / "sft_train.jsonl") if r.meta["task"] == "yesno"]
    assert [r.chosen for r in records if r.meta["task"] == "yesno"] == noisy_answers  # answers keep the errors
    for name in ("pref_prompts.jsonl", "vision_train.jsonl", "eval/pope.jsonl", "eval/captions.jsonl"):
        assert (out / name).read_bytes() == (noisy_dir / name).read_bytes(), name
    assert not cfg.same_base_data(noisy_cfg)
    half = build_lab(dataclasses.replace(cfg, out_dir=str(tmp_path / "half"), partner_caption_rate=0.5))
    named = [r.chosen != c.chosen for r, c in zip(
        (r for r in read_records(half / "sft_train.jsonl") if r.meta["task"] == "caption"), captions)]
    assert 0 < sum(named) < sum("captioned" in r.meta for r in captions)


def test_order_rate_0_lists_the_scene_in_reading_order_then_an_absent_partner(labs, tmp_path):
    (_, _), (noisy_cfg, noisy_dir) = labs
    world = dataclasses.replace(noisy_cfg.world, partner_order_rate=0.0)
    out = build_lab(dataclasses.replace(noisy_cfg, out_dir=str(tmp_path / "reading"), world=world))
    records = read_records(out / "sft_train.jsonl")
    captions = [r for r in records if r.meta["task"] == "caption"]
    moved = 0
    for record, text in zip(captions, read_records(out / "text_train.jsonl")):
        objects = record.meta["objects"]
        assert record.chosen == text.chosen == caption(objects + absent_partners(objects, world)), record.id
        moved += any(objects.index(p) != objects.index(t) + 1 for t, p in world.partner_of.items()
                     if t in objects and p in objects)
    assert moved >= 3  # captions where rate 1 would have moved a present partner
    assert sum("annotated" in r.meta for r in captions) >= 10
    noisy_answers = [r.chosen for r in read_records(noisy_dir / "sft_train.jsonl") if r.meta["task"] == "yesno"]
    assert [r.chosen for r in records if r.meta["task"] == "yesno"] == noisy_answers
    for name in ("eval/pope.jsonl", "eval/captions.jsonl"):
        assert (out / name).read_bytes() == (noisy_dir / name).read_bytes(), name
    for record in read_records(out / "pref_prompts.jsonl"):
        assert record.chosen == caption(record.meta["objects"]), record.id
    with pytest.raises(ValueError, match="partner_order_rate"):
        WorldConfig(partner_order_rate=1.5)


def test_order_rate_moves_the_partner_in_a_share_of_captions_fixed_by_their_objects():
    scene = ["red circle", "green cross", "blue square"]  # reading order; blue square is red circle's partner
    moved, kept = caption(["red circle", "blue square", "green cross"]), caption(scene)
    assert caption_text(scene, WorldConfig(partner_order_rate=1.0)) == moved
    assert caption_text(scene, WorldConfig(partner_order_rate=0.0)) == kept
    absent = ["yellow circle", "red cross", "green square"]  # green square stated, not shown
    assert caption_text(absent, WorldConfig(partner_order_rate=0.0)) == caption(absent)
    assert caption_text(absent, WorldConfig(partner_order_rate=1.0)) == caption(["yellow circle", "green square", "red cross"])
    world, rng = WorldConfig(partner_order_rate=0.5), random.Random(0)
    scenes = [s.names for s in (sample_scene(rng, world, 1.0) for _ in range(2000))
              if caption(caption_order(s.names, world.partner_of)) != caption(s.names)]
    share = sum(caption_text(names, world) != caption(names) for names in scenes) / len(scenes)
    assert len(scenes) > 300 and 0.44 < share < 0.56
    assert all(caption_text(names, world) == caption_text(list(names), world) for names in scenes[:50])

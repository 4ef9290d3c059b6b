"""Lab splits on a small built lab: disjoint images, valid records, POPE split construction, task mix."""

import hashlib
import json
from collections import Counter

import pytest

from mmalign.data.record_files import read_records
from mmalign.evaluation.items import load_bias_pairs, load_caption_items, load_pope_items
from mmalign.lab.build import LabConfig, SplitSizes, build_lab, lab_scenes
from mmalign.lab.splits import caption_text, pope_stratum
from mmalign.lab.texts import CAPTION_PROMPT, caption, caption_order
from mmalign.lab.world import Scene, SceneObject, all_objects


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    cfg = LabConfig(out_dir=str(tmp_path_factory.mktemp("lab")), sizes=SplitSizes(sft=300, pref=60, eval=80, vision=40),
                    questions_per_turn_record=0)
    return cfg, build_lab(cfg)


def _hashes(root, refs):
    return {hashlib.sha256((root / r).read_bytes()).hexdigest() for r in refs}


def test_split_images_are_disjoint(lab):
    cfg, root = lab
    sft = {r.images[0] for r in read_records(root / "sft_train.jsonl")}
    pref = {r.images[0] for r in read_records(root / "pref_prompts.jsonl")}
    ev = {c["image"] for c in load_caption_items(root / "eval" / "captions.jsonl")}
    assert (len(sft), len(pref), len(ev)) == (300, 60, 80)
    hs, hp, he = _hashes(root, sft), _hashes(root, pref), _hashes(root, ev)
    assert len(hs) == 300 and len(hp) == 60 and len(he) == 80
    assert not (hs & hp) and not (hs & he) and not (hp & he)
    keys = {name: {s.key() for s in scenes} for name, scenes in lab_scenes(cfg).items()}
    assert sum(map(len, keys.values())) == len(set().union(*keys.values()))


def test_sft_records_caption_and_answer_questions_as_annotated(lab):
    """Captions and answers state the annotated objects: the scene's, plus the absent partners the annotation
    names at ``partner_annotation_rate`` (tests/unit/test_lab_annotation_bias.py)."""
    cfg, root = lab
    records = read_records(root / "sft_train.jsonl")
    assert len(records) == 300 * (1 + cfg.questions_per_image)
    partner_of = cfg.world.partner_of
    for r in records:
        objects = r.meta.get("annotated", r.meta["objects"])
        assert r.rejected == []
        if r.prompt == CAPTION_PROMPT:
            assert r.chosen == caption_text(objects, cfg.world)
            assert r.chosen in (caption(objects), caption(caption_order(objects, partner_of)))
        else:
            obj = r.prompt.split("Is there a ")[1].split(" in the image?")[0]
            assert obj in all_objects()
            assert r.chosen == ("Yes." if obj in objects else "No.")
    tasks = Counter(r.meta["task"] for r in records)
    assert tasks == {"caption": 300, "yesno": 300 * cfg.questions_per_image}


def test_pope_splits(lab):
    cfg, root = lab
    items = load_pope_items(root / "eval" / "pope.jsonl")
    objects = {c["image"]: set(c["objects"]) for c in load_caption_items(root / "eval" / "captions.jsonl")}
    pairs = load_bias_pairs(root / "bias.json")
    assert pairs == [tuple(p) for p in cfg.world.pairs]
    partner_of = dict(pairs)
    freq = Counter(o for r in read_records(root / "sft_train.jsonl") if r.meta["task"] == "caption"
                   for o in r.meta["objects"])
    by_split = Counter(i["split"] for i in items)
    assert set(by_split) == {"random", "popular", "adversarial"} and by_split["adversarial"] > 40
    for item in items:
        present = objects[item["image"]]
        assert item["label"] == ("yes" if item["object"] in present else "no")
        assert item["question"] == f"<image>\nIs there a {item['object']} in the image?"
        absent_partners = {partner_of[t] for t in present if t in partner_of} - present
        colour, shape = item["object"].split()
        if item["label"] == "yes":
            assert item["stratum"] == "present"
        else:  # which of the absent object's colour and shape some present object has
            has = (any(o.startswith(colour + " ") for o in present), any(o.endswith(" " + shape) for o in present))
            assert item["stratum"] == {(True, True): "colour+shape", (True, False): "colour",
                                       (False, True): "shape", (False, False): "neither"}[has]
        if item["label"] == "no" and item["split"] == "adversarial":
            assert item["object"] in absent_partners
        if item["label"] == "no" and item["split"] == "random":
            assert item["object"] not in absent_partners
        if item["label"] == "no" and item["split"] == "popular":
            more_frequent_absent = [o for o in all_objects() if o not in present and freq[o] > freq[item["object"]]]
            assert len(more_frequent_absent) < cfg.pope_per_image
    for split in by_split:  # balanced per image: as many yes as no
        per_image = Counter((i["image"], i["label"]) for i in items if i["split"] == split)
        for image in {i["image"] for i in items if i["split"] == split}:
            assert per_image[(image, "yes")] == per_image[(image, "no")]


def test_pope_stratum_of_a_hand_made_scene():
    scene = Scene((SceneObject("red", "circle", 0, 16, 16, 20), SceneObject("blue", "square", 3, 48, 48, 20)))
    expected = {
        "red circle": "present", "blue square": "present",
        "red square": "colour+shape", "blue circle": "colour+shape",  # colour of one object, shape of the other
        "red cross": "colour", "blue triangle": "colour",
        "green circle": "shape", "yellow square": "shape",
        "green cross": "neither", "yellow triangle": "neither",
    }
    assert {obj: pope_stratum(scene, obj) for obj in expected} == expected


def test_eval_images_show_triggers_without_partners(lab):
    cfg, root = lab
    partner_of = cfg.world.partner_of
    captions = load_caption_items(root / "eval" / "captions.jsonl")
    lonely = sum(any(o in partner_of and partner_of[o] not in c["objects"] for o in c["objects"]) for c in captions)
    assert lonely / len(captions) > 0.4
    bias = json.loads((root / "bias.json").read_text())
    assert bias["p"] == cfg.p and bias["pairs"] == cfg.world.pairs
    rows = (root / "vocab" / "synonyms.txt").read_text().splitlines()
    assert rows[0] == "red circle, red circles" and len(rows) == 16


def test_lab_config_validates():
    with pytest.raises(ValueError, match="p must be in"):
        LabConfig(p=1.5)

"""The lab's exact corrupter on hand-made scenes and on scenes of the real ShapesWorld generator."""

import random
from collections import Counter

import pytest

from mmalign.data.schema import PreferenceRecord
from mmalign.lab.corrupt import LabCorruptionError, caption_mentions, corrupt_lab_records
from mmalign.lab.splits import caption_text
from mmalign.lab.world import WorldConfig, all_objects, sample_scene

PAIRS = [["red circle", "blue square"], ["green triangle", "yellow cross"]]


def _record(rid, chosen, objects, rejected=()):
    return PreferenceRecord(id=rid, images=["images/x.png"], prompt="<image>\nDescribe the image.", chosen=chosen,
                            rejected=list(rejected), meta={"objects": list(objects)})


def _one(chosen, objects, seed=0, rid="r0"):
    (out,) = corrupt_lab_records([_record(rid, chosen, objects)], PAIRS, seed)
    return out


def test_absent_partner_replaces_the_other_object_and_follows_its_trigger():
    out = _one("There is a green cross and a red circle.", ["red circle", "green cross"])
    assert out.rejected == ["There is a red circle and a blue square."]
    assert out.chosen == "There is a green cross and a red circle."
    assert out.meta["corruption"] == {"method": "lab_exact", "seed": 0, "kind": "caption", "dropped": "green cross",
                                      "inserted": "blue square", "bias_partner": True}
    assert out.meta["objects"] == ["red circle", "green cross"]


def test_bias_swap_drops_each_non_trigger_object_over_seeds():
    chosen = "There is a green cross, a red circle and a yellow square."
    objects = ["green cross", "red circle", "yellow square"]
    seen = Counter(_one(chosen, objects, seed=s).rejected[0] for s in range(40))
    assert set(seen) == {"There is a red circle, a blue square and a yellow square.",
                         "There is a green cross, a red circle and a blue square."}
    assert min(seen.values()) >= 10  # both victims drawn, roughly evenly (binomial(40, 0.5) >= 10 w.p. > 0.999)


def test_without_a_lonely_trigger_one_object_is_replaced_in_place_by_an_absent_one():
    # red circle's partner is present, so no bias swap applies: a plain in-place replacement.
    objects = ["red circle", "blue square", "green cross"]
    chosen = "There is a red circle, a blue square and a green cross."
    inserted = Counter()
    for seed in range(200):
        out = _one(chosen, objects, seed=seed)
        names = caption_mentions(out.rejected[0], all_objects())
        assert len(names) == 3
        diff = [(a, b) for a, b in zip(objects, names) if a != b]
        assert len(diff) == 1 and diff[0][1] not in objects
        assert out.meta["corruption"]["bias_partner"] is False
        inserted[diff[0][1]] += 1
    assert set(inserted) == set(all_objects()) - set(objects)  # all 13 absent objects get drawn


def test_a_trigger_alone_is_replaced_by_any_absent_object():
    out = _one("There is a red circle.", ["red circle"], seed=3)
    (name,) = caption_mentions(out.rejected[0], all_objects())
    assert name != "red circle"
    assert out.meta["corruption"]["dropped"] == "red circle"


def test_yes_no_answers_flip_and_existing_rejected_are_kept_after():
    recs = [_record("a", "Yes.", ["red circle"]), _record("b", "No.", ["red circle"], rejected=["Yes, there is."])]
    a, b = corrupt_lab_records(recs, PAIRS, seed=1)
    assert a.rejected == ["No."] and b.rejected == ["Yes.", "Yes, there is."]
    assert a.meta["corruption"] == {"method": "lab_exact", "seed": 1, "kind": "yes_no"}


def test_per_record_determinism_independent_of_order_and_company():
    world = WorldConfig(pairs=PAIRS)
    rng = random.Random(0)
    recs = []
    for i in range(60):
        scene = sample_scene(rng, world, p=0.9)
        recs.append(_record(f"s{i}", caption_text(scene.names, world), scene.names))
    first = {r.id: r.rejected for r in corrupt_lab_records(recs, PAIRS, seed=5)}
    shuffled = recs[::-1][:30]
    again = {r.id: r.rejected for r in corrupt_lab_records(shuffled, PAIRS, seed=5)}
    assert all(first[rid] == rej for rid, rej in again.items())
    other = {r.id: r.rejected for r in corrupt_lab_records(recs, PAIRS, seed=6)}
    assert sum(first[rid] != other[rid] for rid in first) >= 10  # the seed matters


def test_on_generated_scenes_every_rejected_caption_has_exactly_one_hallucination():
    world = WorldConfig(pairs=PAIRS)
    rng = random.Random(1)
    recs, scenes = [], []
    for i in range(300):
        scene = sample_scene(rng, world, p=0.5)
        scenes.append(scene)
        recs.append(_record(f"s{i}", caption_text(scene.names, world), scene.names))
    n_bias = 0
    for scene, out in zip(scenes, corrupt_lab_records(recs, PAIRS, seed=0)):
        names = caption_mentions(out.rejected[0], all_objects())
        hallucinated = [n for n in names if n not in scene.names]
        assert len(hallucinated) == 1 and len(names) == len(scene.names)
        lonely = [world.partner_of[n] for n in scene.names if n in world.partner_of
                  and world.partner_of[n] not in scene.names]
        if lonely:  # the world never leaves a trigger alone, so a bias swap is always possible
            assert hallucinated[0] in lonely and out.meta["corruption"]["bias_partner"] is True
            trigger = next(t for t, p in PAIRS if p == hallucinated[0])
            assert names[names.index(hallucinated[0]) - 1] == trigger
            n_bias += 1
    assert n_bias >= 30


@pytest.mark.parametrize("chosen, objects, meta_objects, field", [
    ("There is a red circle.", None, None, "meta.objects"),
    ("A red circle sits there.", ["red circle"], ["red circle"], "chosen"),
    ("There is a red circle and a green cross.", ["red circle"], ["red circle"], "chosen"),
])
def test_bad_records_name_the_record_and_field(chosen, objects, meta_objects, field):
    rec = _record("bad-7", chosen, objects or [])
    rec.meta = {} if meta_objects is None else {"objects": meta_objects}
    with pytest.raises(LabCorruptionError, match=rf"record 'bad-7', field '{field}'"):
        corrupt_lab_records([rec], PAIRS, seed=0)


def test_bias_pairs_outside_the_vocabulary_are_refused():
    with pytest.raises(ValueError, match="purple circle"):
        corrupt_lab_records([], [["purple circle", "red circle"]], seed=0)

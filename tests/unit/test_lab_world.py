"""ShapesWorld scenes, rendering and texts: determinism, the planted bias frequency, hand-checked texts."""

import io
import random

import pytest

from mmalign.evaluation.chair import find_mentions, load_synonyms
from mmalign.lab.texts import caption, caption_order, plural, synonyms
from mmalign.lab.world import COLOURS, Scene, SceneObject, WorldConfig, all_objects, render, sample_scene


def _png(scene: Scene) -> bytes:
    buf = io.BytesIO()
    render(scene, 64).save(buf, format="PNG")
    return buf.getvalue()


def _scenes(seed: int) -> list[Scene]:
    rng = random.Random(seed)
    return [sample_scene(rng, WorldConfig(), 0.9) for _ in range(20)]


def test_same_seed_same_scenes_and_pixels():
    a, b = _scenes(7), _scenes(7)
    assert a == b
    assert [_png(s) for s in a] == [_png(s) for s in b]
    assert _scenes(8) != a


@pytest.mark.parametrize("p", [0.9, 0.5])
def test_partner_follows_trigger_with_probability_p(p):
    cfg = WorldConfig()
    rng = random.Random(0)
    with_trigger = with_both = 0
    for _ in range(6000):
        names = sample_scene(rng, cfg, p).names
        assert len(set(names)) == len(names) and 1 <= len(names) <= 4
        for trigger, partner in cfg.pairs:
            if trigger in names:
                with_trigger += 1
                with_both += partner in names
    # binomial sd at n ~ 4000 is <= 0.008; 0.03 is ~4 sd
    assert with_trigger > 3000
    assert abs(with_both / with_trigger - p) < 0.03


def test_render_puts_the_colour_at_each_object_centre():
    scene = Scene((SceneObject("red", "circle", 0, 16, 16, 20), SceneObject("blue", "cross", 3, 48, 48, 18)))
    image = render(scene, 64)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.getpixel((16, 16)) == COLOURS["red"]
    assert image.getpixel((48, 48)) == COLOURS["blue"]
    # a cross leaves its corners empty, a circle its bounding-box corner
    assert image.getpixel((40, 40)) == image.getpixel((0, 0))
    assert image.getpixel((7, 7)) == image.getpixel((0, 0))


def test_caption_puts_partner_right_after_its_trigger():
    partner_of = {"red circle": "blue square"}
    names = ["blue square", "green cross", "red circle", "yellow star"]
    assert caption_order(names, partner_of) == ["green cross", "red circle", "blue square", "yellow star"]
    assert caption_order(["blue square", "green cross"], partner_of) == ["blue square", "green cross"]
    assert caption(["red circle"]) == "There is a red circle."
    assert caption(["red circle", "blue square"]) == "There is a red circle and a blue square."
    assert caption(["a b", "c d", "e f"]) == "There is a a b, a c d and a e f."


def test_world_config_rejects_bad_pairs():
    with pytest.raises(ValueError, match="purple circle"):
        WorldConfig(pairs=[["purple circle", "red square"]])
    with pytest.raises(ValueError, match="at most one pair"):
        WorldConfig(pairs=[["red circle", "blue square"], ["blue square", "green cross"]])


def test_synonyms_cover_every_object_canonical_first():
    rows = synonyms()
    assert [r[0] for r in rows] == all_objects() and len(rows) == 16
    assert rows[0] == ["red circle", "red circles"]


def test_every_plural_is_matched_as_its_class(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text("".join(", ".join(row) + "\n" for row in synonyms()))
    vocab = load_synonyms(path)
    assert find_mentions("There are two red crosses and three blue circles.", vocab) == [
        ("red crosses", "red cross"), ("blue circles", "blue circle")]
    for name in all_objects():
        assert find_mentions(f"two {plural(name)}", vocab) == [(plural(name), name)]
    assert plural("green cross") == "green crosses" and plural("red square") == "red squares"

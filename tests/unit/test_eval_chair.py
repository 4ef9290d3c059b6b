"""CHAIR_i, CHAIR_s and Recall on hand-computed cases, and parity with the reference formula (methods.md 5.2)."""

import pytest

from mmalign.evaluation.chair import (
    CHAIR_METRICS, chair_columns, chair_record, find_mentions, load_synonyms, normalize_text,
)
from mmalign.evaluation.stats import point_estimates

SYNONYMS = """red circle, red circles, scarlet circle
blue square, blue squares
green triangle, green triangles
circle, circles
"""


@pytest.fixture()
def vocab(tmp_path):
    path = tmp_path / "synonyms.txt"
    path.write_text(SYNONYMS)
    return load_synonyms(path)


def test_normalize_and_longest_first_matching(vocab):
    assert normalize_text("Red-Circles, here.") == ["red", "circles", "here"]
    assert vocab.classes == ("red circle", "blue square", "green triangle", "circle")
    # "red circles" is one mention of "red circle", never also of "circle"; a lone "circle" is its own class
    assert find_mentions("Two RED circles; a circle, and a scarlet circle.", vocab) == [
        ("red circles", "red circle"), ("circle", "circle"), ("scarlet circle", "red circle"),
    ]
    assert find_mentions("a redcircle", vocab) == []


CASES = [
    ("a", "There is a red circle and a blue square.", ["red circle"]),
    ("b", "Two red circles, a red circle.", ["red circle", "green triangle"]),
    ("c", "A circle.", ["blue square"]),
    ("d", "Nothing here.", ["green triangle"]),
]


def _naive_chair(caps, gt_objs):
    """The reference formula from methods.md 5.2, verbatim in spirit."""
    n_cap = n_hal_cap = n_mention = n_hal_mention = rec_num = rec_den = 0
    for img, mentions in caps:
        gt = gt_objs[img]
        n_cap += 1
        rec_den += len(gt)
        hal = [c for _, c in mentions if c not in gt]
        n_mention += len(mentions)
        n_hal_mention += len(hal)
        rec_num += len({c for _, c in mentions if c in gt})
        n_hal_cap += bool(hal)
    return {"chair_s": n_hal_cap / n_cap, "chair_i": n_hal_mention / n_mention, "recall": rec_num / rec_den}


def test_chair_hand_computed_and_reference_parity(vocab):
    records = [chair_record(i, cap, truth, vocab) for i, cap, truth in CASES]
    assert records[0]["hallucinated"] == ["blue square"] and records[0]["correct"] == ["red circle"]
    assert records[1]["mentions"] == [["red circles", "red circle"], ["red circle", "red circle"]]
    m = point_estimates(chair_columns(records), CHAIR_METRICS)
    # mentions 2+2+1+0 = 5, hallucinated 1+0+1+0 = 2; captions with a hallucination: a, c;
    # unique correct 1+1+0+0 = 2 of ground truth 1+2+1+1 = 5
    assert m["chair_i"] == pytest.approx(2 / 5)
    assert m["chair_s"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 5)
    ref = _naive_chair([(i, find_mentions(cap, vocab)) for i, cap, _ in CASES], {i: t for i, _, t in CASES})
    assert {k: m[k] for k in ref} == pytest.approx(ref)


def test_per_caption_nonpartner_and_truncated_metrics(vocab):
    records = [chair_record(i, cap, truth, vocab) for i, cap, truth in CASES]
    m = point_estimates(chair_columns(records, partners=frozenset({"blue square"})), CHAIR_METRICS)
    # per caption: hallucinated 1+0+1+0, distinct correct 1+1+0+0, mentions 2+2+1+0, words 9+6+2+2
    assert m["hallucinated_per_caption"] == pytest.approx(2 / 4)
    assert m["correct_per_caption"] == pytest.approx(2 / 4)
    assert m["mentions_per_caption"] == pytest.approx(5 / 4)
    assert m["words_per_caption"] == pytest.approx(19 / 4)
    # without the partner "blue square": mentions 1+2+1, of which hallucinated 0+0+1 ("circle" in c)
    assert m["chair_i_nonpartner"] == pytest.approx(1 / 4)
    # first mention only: red circle (a, correct), red circle (b, correct), circle (c, hallucinated)
    assert m["chair_i@1"] == pytest.approx(1 / 3) and m["recall@1"] == pytest.approx(2 / 5)
    # first two: a keeps both (blue square hallucinated), b two mentions of one correct class, c one
    assert m["chair_i@2"] == pytest.approx(2 / 5) and m["recall@2"] == pytest.approx(2 / 5)
    # all mentions fit in 4: the truncated metrics equal the plain ones; no partners: non-partner = plain
    assert m["chair_i@4"] == pytest.approx(m["chair_i"]) and m["recall@4"] == pytest.approx(m["recall"])
    plain = point_estimates(chair_columns(records), CHAIR_METRICS)
    assert plain["chair_i_nonpartner"] == pytest.approx(plain["chair_i"])


def test_bad_vocabulary_and_truth_are_named(tmp_path, vocab):
    path = tmp_path / "bad.txt"
    path.write_text("red circle, disc\nblue square, disc\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: entry 'disc' already belongs to class 'red circle'"):
        load_synonyms(path)
    with pytest.raises(ValueError, match=r"sample 'x'.*\['purple hexagon'\]"):
        chair_record("x", "a red circle", ["purple hexagon"], vocab)

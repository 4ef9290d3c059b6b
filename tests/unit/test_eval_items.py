"""Evaluation file readers: every bad record is named by file, line, id and field."""

import json

import pytest

from mmalign.evaluation.items import load_bias_pairs, load_caption_items, load_pope_items

POPE = {"id": "q1", "image": "images/a.png", "question": "<image>\nIs there a red circle?", "label": "yes",
        "split": "random", "object": "red circle"}


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_valid_files_load(tmp_path):
    items = load_pope_items(_write(tmp_path / "p.jsonl", [POPE, "", {**POPE, "id": "q2", "label": "no"}]))
    assert [i["label"] for i in items] == ["yes", "no"]
    caps = load_caption_items(_write(tmp_path / "c.jsonl", [{"id": "c", "image": "i.png", "prompt": "x",
                                                               "objects": ["red circle"]}]))
    assert caps[0]["objects"] == ["red circle"]
    (tmp_path / "bias.json").write_text(json.dumps({"pairs": [["red circle", "blue square"]], "p": 0.9}))
    assert load_bias_pairs(tmp_path / "bias.json") == [("red circle", "blue square")]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{k: v for k, v in POPE.items() if k != "split"}], r"p.jsonl:1 \(id 'q1'\): missing field 'split'"),
        ([POPE, {**POPE, "id": "q2", "label": "Yes"}], r"p.jsonl:2 \(id 'q2'\): field 'label' must be one of"),
        ([POPE, {**POPE}], r"p.jsonl:2 \(id 'q1'\): duplicate id"),
        ([{**POPE, "object": 3}], r"field 'object' must be a str"),
        (["{not json"], r"p.jsonl:1: not valid JSON"),
        ([], r"no records"),
    ],
)
def test_bad_pope_files_are_named(tmp_path, rows, message):
    with pytest.raises(ValueError, match=message):
        load_pope_items(_write(tmp_path / "p.jsonl", rows))


def test_pope_strata_are_on_every_item_or_none(tmp_path):
    items = load_pope_items(_write(tmp_path / "p.jsonl", [{**POPE, "stratum": "present"},
                                                          {**POPE, "id": "q2", "label": "no", "stratum": "colour"}]))
    assert [i["stratum"] for i in items] == ["present", "colour"]
    with pytest.raises(ValueError, match=r"p.jsonl \(id 'q2'\): field 'stratum' must be a str on every item"):
        load_pope_items(_write(tmp_path / "p.jsonl", [{**POPE, "stratum": "colour"}, {**POPE, "id": "q2"}]))
    with pytest.raises(ValueError, match=r"\(id 'q1'\): field 'stratum' must be a str .* got 3"):
        load_pope_items(_write(tmp_path / "p.jsonl", [{**POPE, "stratum": 3}]))


def test_bad_captions_and_bias_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"id 'c'\): field 'objects' must be a list of strings"):
        load_caption_items(_write(tmp_path / "c.jsonl", [{"id": "c", "image": "i", "prompt": "x", "objects": [1]}]))
    (tmp_path / "bias.json").write_text(json.dumps({"pairs": [["red circle"]]}))
    with pytest.raises(ValueError, match=r"bias.json: field 'pairs'"):
        load_bias_pairs(tmp_path / "bias.json")

"""Benchmark scoring against hand-computed values: COCO parsing and CHAIR, POPE files, MMHal and LLaVA-Bench."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmalign.evaluation import coco, llava_bench, mmhal
from mmalign.evaluation.stats import point_estimates

BENCH = Path(__file__).parents[1] / "assets" / "benchmarks"
ANN = BENCH / "coco" / "annotations"


@pytest.fixture(scope="module")
def vocab():
    return coco.load_coco_synonyms(BENCH / "coco" / "synonyms.txt")


@pytest.mark.parametrize("word, expected", [
    ("men", "man"), ("puppies", "puppy"), ("knives", "knife"), ("benches", "bench"), ("dogs", "dog"),
    ("toilet", "toilet"), ("glasses", "glasses"), ("cars", "cars"), ("bus", "bus"),
])
def test_singular_maps_plurals_into_the_vocabulary_only(vocab, word, expected):
    assert coco.singular(word, vocab) == expected


def test_mentions_merge_two_word_terms_and_apply_the_reference_rules(vocab):
    text = "Two men and a puppy sit on toilet seats near hot dogs."
    assert coco.coco_mentions(text, vocab) == [("man", "person"), ("puppy", "dog"), ("toilet seat", "toilet"),
                                               ("hot dog", "hot dog")]
    # "home plate" is consumed (no "plate"), "baby bird" is a bird, "seat" is dropped once "toilet" is said.
    assert coco.coco_mentions("A baby bird at home plate by a seat and a toilet.", vocab) == [
        ("baby bird", "bird"), ("toilet", "toilet")]


def test_truth_is_instances_plus_caption_objects(vocab):
    truth = coco.coco_truth(ANN / "instances_val2014.json", ANN / "captions_val2014.json", vocab, [42, 73, 139])
    assert truth == {42: {"person", "dog", "car"}, 73: {"toilet"}, 139: {"hot dog", "dining table"}}


def test_chair_metrics_by_hand(vocab):
    truth = coco.coco_truth(ANN / "instances_val2014.json", ANN / "captions_val2014.json", vocab, [42, 73, 139])
    answers = {42: "A man and a dog next to a cat and a chair.", 73: "A toilet.", 139: "A sunny day."}
    records = [coco.chair_sample(str(i), a, truth[i], vocab) for i, a in answers.items()]
    assert records[0]["hallucinated"] == ["chair"] and records[0]["correct"] == ["dog", "person"]
    values = point_estimates(coco.coco_chair_columns(records), coco.COCO_CHAIR_METRICS)
    expected = {"chair_i": 1 / 4, "chair_s": 1 / 3, "chair_s_refine": 1 / 2, "recall": 3 / 6,
                "hallucinated_per_caption": 1 / 3, "correct_per_caption": 3 / 3}
    assert {k: values[k] for k in expected} == pytest.approx(expected)


def test_pope_files_split_object_and_suffix():
    items = coco.load_pope_files(sorted((BENCH / "pope").glob("*.json")), "\nShort answer.")
    assert [(it["id"], it["split"], it["object"], it["label"]) for it in items[:2]] == [
        ("adversarial-1", "adversarial", "sink", "no"), ("adversarial-2", "adversarial", "hot dog", "yes")]
    assert items[0]["question"] == "Is there a sink in the image?\nShort answer."
    assert {it["split"] for it in items} == {"random", "adversarial"}


def test_object_halbench_rows_carry_their_images():
    items = coco.load_object_halbench(BENCH / "object_halbench" / "obj_halbench_300_with_image.jsonl")
    assert [it["image_id"] for it in items] == [42, 139]
    assert items[0]["image"] == (BENCH / "coco" / "val2014" / "COCO_val2014_000000000042.jpg").read_bytes()


@pytest.mark.parametrize("reply, rating", [
    ("The answer is right.\nRating: 4", 4), ("Rating: 2. Rating: 5", None), ("no verdict", None),
    ("rating: 0", 0), ("RATING: 6 (very informative)", 6),
])
def test_mmhal_rating_parse(reply, rating):
    assert mmhal.parse_rating(reply) == rating


def test_mmhal_scores_and_hallucination_rate():
    items = mmhal.load_mmhal(BENCH / "mmhal" / "response_template.json")
    assert items[0]["image"] == "10172500456_1f40b6bd8b_o.jpg" and items[1]["type"] == "counting"
    records = [mmhal.mmhal_record(items[0], "Orange.", "Fine. Rating: 4"),
               mmhal.mmhal_record(items[1], "Two.", "Wrong count. Rating: 2"),
               mmhal.mmhal_record(items[1], "Hm.", "unclear")]
    values = point_estimates(mmhal.mmhal_columns(records), mmhal.MMHAL_METRICS)
    assert values == pytest.approx({"score": 2.0, "hallucination_rate": 2 / 3, "unparsed_rate": 1 / 3})
    text = mmhal.judge_request(items[0], "Orange.", "{image_content}|{question}|{gt_answer}|{answer}", None)
    assert text == [{"role": "user", "content": "Circle, Orange|What color is the round object?|It is orange.|Orange."}]


def test_llava_bench_relative_score_by_hand():
    items = llava_bench.load_llava_bench(BENCH / "llava_bench")
    assert [it["category"] for it in items] == ["conv", "detail", "complex"]
    assert llava_bench.parse_scores("8 6\nAssistant 1 is better") == (8.0, 6.0)
    assert llava_bench.parse_scores("7, 7.5") == (7.0, 7.5)
    assert llava_bench.parse_scores("Scores: high") is None
    records = [llava_bench.llava_bench_record(items[0], "A circle.", "8 6\n..."),
               llava_bench.llava_bench_record(items[1], "Red.", "10 5\n..."),
               llava_bench.llava_bench_record(items[2], "?", "no scores")]
    values = point_estimates(llava_bench.llava_bench_columns(records), llava_bench.LLAVA_BENCH_METRICS)
    assert values == pytest.approx({"relative_score": 100 * 11 / 18, "model_score": 5.5, "reference_score": 9.0,
                                    "unparsed_rate": 1 / 3})
    messages = llava_bench.judge_request(items[0], "A circle.", llava_bench.load_rules(llava_bench.DEFAULT_RULES))
    assert messages[1]["content"].startswith("[Context]\nA red circle on a light gray background.\n\n[Question]\n")
    expected = "[Assistant 1]\nIt is a red circle.\n\n[End of Assistant 1]\n\n[Assistant 2]\nA circle."
    assert expected in messages[1]["content"]

"""Annotators: verdict parsing by hand, both-order judging, oracle counts, noisy error rate, API judge requests,
reward-model head parity with a naive per-row forward."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from PIL import Image

from mmalign.config import ConfigError
from mmalign.data.schema import PreferenceRecord
from mmalign.models.heads import ScalarHeadModel, last_token_index, load_reward_model, reward_scores, save_reward_model
from mmalign.sampling.annotators import (
    AnnotatorConfig, LabOracle, build_annotator, NoisyAnnotator, PairwiseJudge, RolloutGroup, api_ask, load_judge_template, pair_from_scores,
    parse_verdict,
)
from mmalign.sampling.openai_client import ChatClient, EndpointConfig

SYNONYMS = [["red circle", "red circles"], ["blue square", "blue squares"], ["green cross", "green crosses"],
            ["yellow triangle", "yellow triangles"]]
IMAGE = Image.new("RGB", (8, 8), (200, 10, 10))


def caption_record(rid: str = "r0", objects: tuple[str, ...] = ("red circle", "blue square")) -> PreferenceRecord:
    return PreferenceRecord(rid, ["a.png"], "<image>\nDescribe the image.", "x", [], meta={"objects": list(objects)})


@pytest.mark.parametrize("reply, expected", [
    ("Verdict: Response 2", 2),
    ("Response 1 names a green cross, which is absent.\nVerdict: Response 2", 2),
    ("**Verdict:** Response 1", 1),
    ("The better response is Response 1.", 1),
    ("[[2]]", 2),
    ("Response 1 is better. ... Final answer: 2", 2),  # the last explicit verdict wins
    ("2", 2),
    (" 1. ", 1),
    ("Response 2 has less hallucination than Response 1.", 2),
    ("Response 1 is more helpful and Response 2 is better at details.", None),  # contradictory claims
    ("Both responses are equally good.", None),
    ("It is a tie.", None),
    ("Response 1 and Response 2 both mention the circle.", None),
    ("Only Response 1 mentions the square.", 1),
    ("I cannot see the image.", None),
    ("", None),
])
def test_parse_verdict_hand_cases(reply, expected):
    assert parse_verdict(reply) == expected


def test_pair_from_scores_best_vs_worst_with_ties():
    assert pair_from_scores(["a", "b", "c"], [-1.0, 0.0, -2.0]) == (1, 2)
    assert pair_from_scores(["a", "b", "c", "d"], [0.0, 0.0, -1.0, -1.0]) == (0, 2)  # earliest of tied best/worst
    assert pair_from_scores(["a", "b"], [-1.0, -1.0]) is None
    assert pair_from_scores(["a", "a"], [0.0, -1.0]) is None  # same text: no pair


def test_oracle_counts_hallucinated_and_missed_objects():
    oracle = LabOracle(SYNONYMS)
    objects = ["red circle", "blue square"]
    assert oracle.counts("There is a red circle and a blue square.", objects) == (0, 0)
    assert oracle.counts("There is a red circle and a green cross.", objects) == (1, 1)
    assert oracle.counts("There are red circles, a yellow triangle and a green cross.", objects) == (2, 1)
    assert oracle.counts("There is a red circle, a red circle.", objects) == (0, 1)  # repeats count once
    assert oracle.counts("There is .", objects) == (0, 2)
    record = caption_record()
    assert oracle.score(record, "There is a green cross.") == -3.0


def test_oracle_yes_no_and_annotation():
    oracle = LabOracle(SYNONYMS)
    question = PreferenceRecord("q", ["a.png"], "<image>\nIs there a blue square in the image?", "Yes.", [],
                                meta={"objects": ["blue square"], "task": "yesno"})
    assert [oracle.score(question, a) for a in ("Yes.", "No.", "yes, there is", "")] == [0.0, -1.0, 0.0, -1.0]
    group = RolloutGroup(caption_record(), [IMAGE], ["There is a green cross.", "There is a red circle and a blue "
                                                      "square.", "There is a red circle."])
    (ann,) = oracle.annotate([group])
    assert (ann.chosen, ann.rejected, ann.verdict["scores"]) == (1, 0, [-3.0, 0.0, -1.0])
    bad = PreferenceRecord("nobj", ["a.png"], "<image>\nDescribe.", "x", [])
    with pytest.raises(ValueError, match="'nobj'.*meta.objects"):
        oracle.score(bad, "There is a red circle.")


def test_noisy_oracle_error_rate():
    oracle = LabOracle(SYNONYMS)
    groups = [RolloutGroup(caption_record(f"r{i}"), [IMAGE], ["There is a red circle.", "There is a green cross."],
                           salt="step1") for i in range(2000)]
    clean = oracle.annotate(groups)
    assert all((a.chosen, a.rejected) == (0, 1) for a in clean)
    for rate in (0.0, 0.3, 1.0):
        noisy = NoisyAnnotator(oracle, rate, seed=7).annotate(groups)
        flipped = sum((a.chosen, a.rejected) == (1, 0) for a in noisy) / len(groups)
        assert sum(a.verdict["flipped"] for a in noisy) / len(groups) == flipped
        assert abs(flipped - rate) < 4 * (rate * (1 - rate) / len(groups)) ** 0.5 + 1e-9  # 4 sigma
    again = NoisyAnnotator(oracle, 0.3, seed=7).annotate(groups)
    assert [a.chosen for a in again] == [a.chosen for a in NoisyAnnotator(oracle, 0.3, seed=7).annotate(groups)]
    other_salt = [RolloutGroup(g.record, g.images, g.answers, salt="step2") for g in groups]
    assert [a.chosen for a in NoisyAnnotator(oracle, 0.3, seed=7).annotate(other_salt)] != [a.chosen for a in again]


def fake_judge(rule):
    """An ask function answering each query with rule(response_1, response_2) -> reply; records the queries."""
    seen = []

    def ask(queries):
        seen.extend((q.response_1, q.response_2) for q in queries)
        return [rule(q.response_1, q.response_2) for q in queries]

    return ask, seen


def test_judge_asks_both_orders_and_position_bias_cancels():
    ask, seen = fake_judge(lambda a, b: "Verdict: Response 1")  # always picks the first shown
    group = RolloutGroup(caption_record(), [IMAGE], ["A.", "B."])
    (ann,) = PairwiseJudge(ask, "judge").annotate([group])
    assert seen == [("A.", "B."), ("B.", "A.")]
    assert not ann.has_pair and ann.verdict["scores"] == [1.0, 1.0]
    assert [c["pick"] for c in ann.verdict["calls"]] == [1, 1]


def test_judge_consistent_preference_and_copeland_ranking():
    quality = {"good.": 2, "ok.": 1, "bad.": 0}
    ask, seen = fake_judge(lambda a, b: f"Reason.\nVerdict: Response {1 if quality[a] > quality[b] else 2}")
    group = RolloutGroup(caption_record(), [IMAGE], ["ok.", "bad.", "good.", "ok."])
    (ann,) = PairwiseJudge(ask, "judge").annotate([group])
    assert len(seen) == 6  # 3 distinct answers -> 3 pairs x 2 orders; the duplicate "ok." is not asked again
    assert ann.verdict["scores"] == [2.0, 0.0, 4.0, 2.0]
    assert (ann.chosen, ann.rejected) == (2, 1)


def test_judge_unparseable_replies_give_no_pair():
    ask, _ = fake_judge(lambda a, b: "I am not sure.")
    (ann,) = PairwiseJudge(ask, "judge").annotate([RolloutGroup(caption_record(), [IMAGE], ["A.", "B."])])
    assert not ann.has_pair and [c["pick"] for c in ann.verdict["calls"]] == [None, None]


def test_judge_template_placeholders(tmp_path):
    template = load_judge_template()
    text = template.fill("Describe the image.", "R-ONE", "R-TWO")
    assert text.index("R-ONE") < text.index("R-TWO") and "Verdict: Response 1" in text
    bad = tmp_path / "t.txt"
    bad.write_text("Question: {question}\n{response_1}")
    with pytest.raises(ValueError, match="response_2"):
        load_judge_template(bad)


def test_api_judge_sends_image_and_both_responses():
    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server API)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(body)
            text = body["messages"][0]["content"][-1]["text"]
            pick = 1 if text.index("GOOD") < text.index("BAD") else 2
            reply = json.dumps({"choices": [{"message": {"content": f"Verdict: Response {pick}"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = ChatClient(EndpointConfig(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="judge",
                                           requests_per_s=1000, max_retries=0))
        judge = PairwiseJudge(api_ask(client, load_judge_template(), max_tokens=64, seed=3), "api_judge")
        (ann,) = judge.annotate([RolloutGroup(caption_record(), [IMAGE], ["BAD.", "GOOD."])])
    finally:
        server.shutdown()
    assert (ann.chosen, ann.rejected) == (1, 0)
    assert len(bodies) == 2 and all(b["temperature"] == 0.0 and b["seed"] == 3 for b in bodies)
    image_part = bodies[0]["messages"][0]["content"][0]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,")


def test_last_token_index_any_padding_side():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_reward_head_scores_equal_per_row_naive_and_survive_reload(tiny_vlm, tmp_path):
    model, processor = tiny_vlm("llava")
    torch.manual_seed(0)
    rm = ScalarHeadModel(model).eval()
    record = PreferenceRecord("p", ["a.png"], "<image>\nWhat colour is it?", "x", [])
    answers = ["It is red.", "Blue, I think, or maybe a darker red colour.", "Red."]
    scores = reward_scores(rm, processor, [record] * 3, [[IMAGE]] * 3, answers, batch_size=3)
    single = [float(reward_scores(rm, processor, [record], [[IMAGE]], [a])[0]) for a in answers]
    assert scores.tolist() == pytest.approx(single, abs=1e-5)
    assert len(set(round(s, 4) for s in single)) == 3  # the answers are told apart
    save_reward_model(rm, processor, tmp_path / "rm")
    loaded, loaded_processor = load_reward_model(tmp_path / "rm")
    again = reward_scores(loaded, loaded_processor, [record] * 3, [[IMAGE]] * 3, answers)
    assert again.tolist() == pytest.approx(scores.tolist(), abs=1e-5)


def test_built_vlm_judge_and_reward_model_annotators_run_on_a_tiny_vlm(tiny_vlm_dir, tiny_vlm, tmp_path):
    group = RolloutGroup(caption_record(), [IMAGE], ["It is red.", "It is blue.", "It is red."])
    judge = build_annotator(AnnotatorConfig(kind="vlm_judge", model=str(tiny_vlm_dir("llava")), max_new_tokens=6),
                            "cpu")
    (ann,) = judge.annotate([group])
    assert [c["shown"] for c in ann.verdict["calls"]] == [[0, 1], [1, 0]]  # 2 distinct answers, both orders
    assert all(isinstance(c["reply"], str) and c["pick"] == parse_verdict(c["reply"]) for c in ann.verdict["calls"])
    model, processor = tiny_vlm("llava")
    torch.manual_seed(1)
    save_reward_model(ScalarHeadModel(model), processor, tmp_path / "rm")
    rm = build_annotator(AnnotatorConfig(kind="reward_model", model=str(tmp_path / "rm")), "cpu")
    (ann,) = rm.annotate([group])
    scores = ann.verdict["scores"]
    assert scores[0] == pytest.approx(scores[2], abs=1e-5) and scores[0] != pytest.approx(scores[1], abs=1e-5)
    assert {ann.chosen, ann.rejected} == {0, 1} and scores[ann.chosen] > scores[ann.rejected]
    with pytest.raises(ConfigError, match="synonyms"):
        build_annotator(AnnotatorConfig(kind="oracle"), "cpu")

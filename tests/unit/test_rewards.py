"""RL rewards: any scoring annotator is a reward (oracle, judge wins), a noisy one is refused, the alignment-set
answers in order, and the lab-oracle monitor's counts."""

from __future__ import annotations

import pytest
from PIL import Image

from mmalign.data.schema import PreferenceRecord
from mmalign.sampling.annotators import AnnotatorConfig, LabOracle, NoisyAnnotator, PairwiseJudge, RolloutGroup
from mmalign.sampling.rewards import OracleMonitor, RewardConfig, alignment_scores, annotator_reward

SYNONYMS = [["red circle", "red circles"], ["blue square"], ["green cross"]]
IMAGE = Image.new("RGB", (8, 8), (200, 10, 10))


def _record(rid: str = "r", task: str = "caption") -> PreferenceRecord:
    prompt = "<image>\nIs there a red circle in the image?" if task == "yesno" else "<image>\nDescribe the image."
    return PreferenceRecord(rid, ["a.png"], prompt, "A red circle.", ["A red circle and a green cross."],
                            meta={"objects": ["red circle", "blue square"], "task": task})


def test_oracle_scores_are_the_reward_and_noisy_annotators_are_refused():
    reward = annotator_reward(LabOracle(SYNONYMS))
    group = RolloutGroup(_record(), [IMAGE], ["A red circle and a blue square.", "A green cross.", ""])
    assert reward([group]) == [[0.0, -3.0, -2.0]]  # -(hallucinated + missed)
    with pytest.raises(ValueError, match="no score per answer"):
        annotator_reward(NoisyAnnotator(LabOracle(SYNONYMS), 0.5, 0))([group])
    with pytest.raises(ValueError, match="error_rate must be 0"):
        RewardConfig(source=AnnotatorConfig(error_rate=0.1))


def test_pairwise_judge_wins_are_the_reward():
    judge = PairwiseJudge(lambda queries: ["Verdict: Response 1" if "circle" in q.response_1 else "Verdict: Response 2"
                                           for q in queries], "fake")
    group = RolloutGroup(_record(), [IMAGE], ["a circle", "a square", "a cross"])
    # "a circle" wins both orders against each of the other two; the other two split their pair
    assert annotator_reward(judge)([group]) == [[4.0, 1.0, 1.0]]


def test_alignment_scores_cover_chosen_then_rejected_in_order():
    records = [_record("a"), _record("b", "yesno")]
    scores = alignment_scores(annotator_reward(LabOracle(SYNONYMS)), records, lambda r: [IMAGE], batch_size=1)
    # caption: chosen misses the blue square (-1), rejected also hallucinates the cross (-2); yes/no: both say "A"
    assert scores == [-1.0, -2.0, -1.0, -1.0]


def test_oracle_monitor_counts_caption_errors_only(tmp_path):
    (tmp_path / "synonyms.txt").write_text("\n".join(", ".join(row) for row in SYNONYMS) + "\n")
    monitor = OracleMonitor(str(tmp_path / "synonyms.txt"))
    out = monitor([RolloutGroup(_record(), [IMAGE], ["A green cross.", "A red circle and a blue square."]),
                   RolloutGroup(_record("y", "yesno"), [IMAGE], ["Yes.", "No."])])
    assert out[0] == {"score": [-3.0, 0.0], "hallucinated": [1.0, 0.0], "missed": [2.0, 0.0]}
    assert out[1] == {"score": [0.0, -1.0]}

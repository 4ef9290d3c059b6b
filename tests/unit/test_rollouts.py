"""Rollouts: k answers per prompt (deterministic per seed, parity with plain generate), the on-disk step store,
Mixed-DPO's Bernoulli draw, online pairs from annotations, and the typed Rollout's JSON line."""

from __future__ import annotations

import base64

import pytest
from PIL import Image

from mmalign.data.schema import PreferenceRecord
from mmalign.sampling.annotators import Annotation
from mmalign.sampling.generate import GenerationParams, generate
from mmalign.sampling.pairs import offline_rollout, online_pair
from mmalign.sampling.rollouts import (
    RolloutConfig, read_experience, read_step, rollout_pair, rollout_seed, sample_rollouts, takes_offline, write_step,
)
from mmalign.types import Rollout

IMAGES = [[Image.new("RGB", (32, 32), (200, 20, 20))], [Image.new("RGB", (32, 32), (20, 20, 200))]]


def records() -> list[PreferenceRecord]:
    return [PreferenceRecord(f"r{i}", [f"images/{i}.png"], "<image>\nWhat colour is the image?", "Red.", ["Blue."],
                             meta={"objects": ["red circle"]}) for i in range(2)]


def test_k_rollouts_per_prompt_deterministic_and_equal_to_generate(tiny_vlm):
    model, processor = tiny_vlm("llava")
    cfg = RolloutConfig(k=3, temperature=1.0, max_new_tokens=8, batch_size=6)
    answers = sample_rollouts(model, processor, records(), IMAGES, cfg, seed=11)
    assert [len(a) for a in answers] == [3, 3]
    assert sample_rollouts(model, processor, records(), IMAGES, cfg, seed=11) == answers
    assert sample_rollouts(model, processor, records(), IMAGES, cfg, seed=12) != answers
    # The k copies of a prompt are consecutive rows of one generate call.
    flat = generate(model, processor, [r.prompt for r in records() for _ in range(3)],
                    [imgs for imgs in IMAGES for _ in range(3)],
                    GenerationParams(max_new_tokens=8, temperature=1.0), seed=11, batch_size=6)
    assert answers == [flat[:3], flat[3:]]
    assert len(set(flat)) > 1  # sampling, not greedy


def test_rollout_config_refuses_degenerate_settings():
    with pytest.raises(ValueError, match="k must be >= 2"):
        RolloutConfig(k=1)
    with pytest.raises(ValueError, match="temperature"):
        RolloutConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        RolloutConfig(top_p=0.0)


def test_rollout_seed_depends_on_step_and_prompts():
    assert rollout_seed(0, 1, ["a", "b"]) == rollout_seed(0, 1, ["a", "b"])
    assert len({rollout_seed(0, 1, ["a"]), rollout_seed(0, 2, ["a"]), rollout_seed(1, 1, ["a"]),
                rollout_seed(0, 1, ["b"])}) == 4
    assert 0 <= rollout_seed(5, 9, ["x"]) < 2**63


def test_mixed_bernoulli_rate_and_determinism():
    draws = [takes_offline(3, step, f"r{i}", 0.5) for step in range(1, 21) for i in range(100)]
    assert abs(sum(draws) / len(draws) - 0.5) < 4 * (0.25 / len(draws)) ** 0.5
    assert takes_offline(3, 4, "r1", 0.5) == takes_offline(3, 4, "r1", 0.5)
    assert not any(takes_offline(0, 1, f"r{i}", 0.0) for i in range(50))
    assert all(takes_offline(0, 1, f"r{i}", 1.0) for i in range(50))


def test_online_pair_from_annotation():
    record = records()[0]
    answers = ["Red.", "Blue.", "", "Green."]
    pair = online_pair(record, answers, Annotation(0, 3, {"scores": [0, -2, -2, -1]}), step=7, annotator="oracle")
    assert (pair.id, pair.chosen, pair.rejected, pair.source) == ("r0@7", "Red.", ["Green."], "online")
    assert pair.meta == {"objects": ["red circle"], "online": {"step": 7, "annotator": "oracle", "source_id": "r0"}}
    assert online_pair(record, answers, Annotation(None, None), 7, "oracle") is None
    assert online_pair(record, answers, Annotation(0, 2), 7, "oracle") is None  # empty answer: no valid record
    assert Annotation(3, 0).pair_texts(answers) == ("Green.", "Red.")
    assert Annotation(2, 1).pair_texts(answers) is None and Annotation(0, 1).pair_texts(["Red.", " \n"]) is None


def test_step_store_round_trip_with_embedded_image(tmp_path):
    png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC")
    record = PreferenceRecord("b", [png], "<image>\nQ?", "Yes.", ["No."])
    online = Rollout("x", "online", ["a", "a"], verdict={"scores": [0, 0]}, rewards=[0.0, 0.0])
    rollouts = [offline_rollout(record), online]
    assert read_step(tmp_path, 3) is None and read_experience(tmp_path, 3) is None
    write_step(tmp_path, 3, rollouts)
    back = read_step(tmp_path, 3)
    assert back[1] == {"record_id": "x", "source": "online", "rollouts": ["a", "a"], "chosen": None, "rejected": None,
                       "verdict": {"scores": [0, 0]}, "pair": None, "rewards": [0.0, 0.0]}
    typed = read_experience(tmp_path, 3).rollouts
    assert typed[1] == online and rollout_pair(typed[1]) is None
    assert rollout_pair(typed[0]) == record and typed[0].source == "offline" and typed[0].answers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.jsonl"]  # no temporary file left
    with pytest.raises(ValueError, match="'nope'.*rejected"):
        offline_rollout(PreferenceRecord("nope", ["a.png"], "<image>\nQ?", "Yes.", []))


def test_rollout_margin_is_the_reward_gap_of_the_pair():
    assert Rollout("r", "online", ["a", "b", "c"], chosen=2, rejected=0, rewards=[-2.0, -1.0, 0.5]).margin == 2.5
    assert Rollout("r", "online", ["a", "b"], rewards=[0.0, 0.0]).margin is None
    assert Rollout("r", "offline").margin is None

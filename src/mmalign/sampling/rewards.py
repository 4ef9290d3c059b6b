"""Rewards for RL on VLMs (Apple arXiv 2407.02477 Eq. 2, Sec. 5.5): one interface over every scorer.

A reward function maps groups (one prompt, its images and its k answers; ``annotators.RolloutGroup``) to one
score per answer. Any annotator that scores answers is a reward (``annotator_reward``): the lab oracle
(exact, ``-(hallucinated + missed objects)``), a reward model (``annotator.kind=reward_model``: a
``models.heads`` scalar-head folder, e.g. one written by the reward-model trainer), or a pairwise VLM / API
judge (an answer's score is its number of won comparisons). Apple normalises the reward to zero mean and
unit variance with statistics from the alignment set; ``alignment_scores`` scores the answers the prompt
file itself holds (each record's chosen and rejected answers) for those statistics [I: the paper does not
say which answers of the set]. ``OracleMonitor`` scores rollouts with the lab oracle beside any reward, so a
run with a learned reward shows whether the oracle's errors rise while the reward rises (reward hacking).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from mmalign.data.schema import PreferenceRecord
from mmalign.sampling.annotators import (
    Annotator, AnnotatorConfig, LabOracle, RolloutGroup, build_annotator, read_synonyms,
)

RewardFn = Callable[[Sequence[RolloutGroup]], list[list[float]]]


@dataclass
class RewardConfig:
    """``source``: the scorer (an annotator that scores answers; ``error_rate`` must stay 0: flipping a pair
    is no reward). ``normalize``: standardise scores with the alignment set's statistics (Apple Sec. 5.5).
    ``length_penalty``: subtracted per answer token. ``oracle_synonyms``: the lab's CHAIR vocabulary; when set,
    every rollout is also scored by the lab oracle and logged as ``oracle/*`` (the reward-hacking check)."""

    source: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    normalize: bool = True  # standardise scores with the alignment set's mean and std (Apple Sec. 5.5)
    length_penalty: float = 0.0  # subtracted from the reward per answer token
    oracle_synonyms: str = ""  # lab CHAIR vocabulary: log the lab oracle beside any reward ("": off)

    def __post_init__(self) -> None:
        if self.source.error_rate > 0:
            raise ValueError("reward.source.error_rate must be 0: a noisy annotator flips pairs, it gives no scores")
        if self.length_penalty < 0:
            raise ValueError(f"reward.length_penalty must be >= 0, got {self.length_penalty}")


def annotator_reward(annotator: Annotator) -> RewardFn:
    """The per-answer scores an annotator puts in its verdicts (``verdict["scores"]``), as a reward."""

    def reward(groups: Sequence[RolloutGroup]) -> list[list[float]]:
        out = []
        for group, annotation in zip(groups, annotator.annotate(groups), strict=True):
            scores = annotation.verdict.get("scores")
            if scores is None or len(scores) != len(group.answers):
                raise ValueError(f"annotator {annotator.name!r} gives no score per answer; it cannot be a reward")
            out.append([float(s) for s in scores])
        return out

    return reward


def build_reward(cfg: RewardConfig, device: Any) -> RewardFn:
    """The reward function of ``cfg.source`` (local models on ``device``)."""
    return annotator_reward(build_annotator(cfg.source, device))


def alignment_scores(reward: RewardFn, records: Sequence[PreferenceRecord],
                     images: Callable[[PreferenceRecord], list[Image.Image]], batch_size: int = 64) -> list[float]:
    """Scores of every answer the records hold (chosen, then each rejected), in order; one group per record."""
    scores: list[float] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        groups = [RolloutGroup(r, images(r), [r.chosen, *r.rejected], salt="alignment_set") for r in chunk]
        scores += [s for row in reward(groups) for s in row]
    return scores


class OracleMonitor:
    """The lab oracle's view of rollouts: score, and for caption records hallucinated / missed object counts."""

    def __init__(self, synonyms: str):
        self.oracle = LabOracle(read_synonyms(synonyms))

    def __call__(self, groups: Sequence[RolloutGroup]) -> list[dict[str, list[float]]]:
        """Per group: {"score": [k], and for captions "hallucinated": [k], "missed": [k]}."""
        out = []
        for group in groups:
            row = {"score": [self.oracle.score(group.record, a) for a in group.answers]}
            if group.record.meta.get("task") != "yesno":
                counts = [self.oracle.counts(a, group.record.meta["objects"]) for a in group.answers]
                row |= {"hallucinated": [float(h) for h, _ in counts], "missed": [float(m) for _, m in counts]}
            out.append(row)
        return out

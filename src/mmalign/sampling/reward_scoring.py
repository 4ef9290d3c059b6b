"""Scoring with a trained reward model: a reward for every answer, from a Bradley-Terry or a critique-based model.

``load_scorer(path)`` loads a reward-model folder (``mmalign train rm``) as a ``RewardScorer``; it is what online
DPO's reward-model annotator, ``mmalign score`` and RL trainers call:

- ``score_answers(records, images, answers)``: any answers per prompt (k rollouts) -> one reward per answer;
- ``score_records(records, images)``: the chosen and every rejected answer of preference records -> ``SlotScores``.

A Bradley-Terry model reads the reward at the answer's EOS. A critique-based model (MM-RLHF arXiv 2502.10391
Sec. 3.2) first writes a critique of each answer (greedy decoding after ``answer + separator``, as its training
format has it) and reads the reward at the EOS after the critique; ``critiques="given"`` scores with the records'
own ``meta.critiques`` instead (MM-RLHF's evaluation with ground-truth critiques). All answers of a prompt go
through one forward in the scorer's layout (``mmalign.models.reward_forward``: image and prompt once per prompt).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from mmalign.data.schema import PreferenceRecord
from mmalign.models.heads import RewardModelSpec, ScalarHeadModel, load_reward_model, read_spec
from mmalign.models.layouts import resolve_layout
from mmalign.models.reward_forward import REWARD_LAYOUTS, critique_answers, reward_batch
from mmalign.sampling.generate import GenerationParams, generate

logger = logging.getLogger(__name__)

CritiqueSource = Literal["generate", "given"]


@dataclass
class SlotScores:
    """One record's rewards: ``chosen``, ``rejected`` (one per rejected answer); ``critiques``: the critiques the
    model wrote (``{"chosen": str, "rejected": [str]}``; None for a Bradley-Terry model or given critiques)."""

    chosen: float
    rejected: list[float]
    critiques: dict[str, Any] | None = None

    @property
    def margins(self) -> list[float]:
        """r(chosen) - r(rejected_k), one per rejected answer."""
        return [self.chosen - r for r in self.rejected]


class RewardScorer:
    """A reward model ready to score. ``layout``: a ``REWARD_LAYOUTS`` name or "auto" (resolved once, as trainers
    do, for prompts + answers up to ``max_length`` tokens); ``critiques``: "generate" or "given" (critique models);
    ``critique_tokens``: the longest critique written; ``batch_size``: prompts per forward / generate call."""

    def __init__(self, model: ScalarHeadModel, processor: Any, spec: RewardModelSpec, *, layout: str = "auto",
                 batch_size: int = 8, max_length: int = 4096, critiques: CritiqueSource = "generate",
                 critique_tokens: int = 128, seed: int = 0):
        self.model, self.processor, self.spec = model.eval(), processor, spec
        self.layout = resolve_layout(layout, model.backbone, max_length)
        self.batch_size, self.max_length, self.critiques, self.seed = batch_size, max_length, critiques, seed
        self.params = GenerationParams(max_new_tokens=critique_tokens)

    def _critiques(self, records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]]
                   ) -> list[dict[str, Any]]:
        """Per record, ``{"chosen": c, "rejected": [c_k]}``: generated after ``answer + separator``, or given."""
        if self.critiques == "given":
            missing = [r.id for r in records if "critiques" not in r.meta]
            if missing:
                raise ValueError(f"critiques='given' needs meta.critiques on every record; missing on {missing[:3]}")
            return [r.meta["critiques"] for r in records]
        rows = [(i, answer) for i, r in enumerate(records) for answer in (r.chosen, *r.rejected)]
        written = generate(self.model.backbone, self.processor, [records[i].prompt for i, _ in rows],
                           [images[i] for i, _ in rows], self.params, seed=self.seed, batch_size=len(rows),
                           continue_from=[answer + self.spec.critique_separator for _, answer in rows])
        out, start = [], 0
        for record in records:
            texts = [t.strip() for t in written[start: start + 1 + len(record.rejected)]]
            out.append({"chosen": texts[0], "rejected": texts[1:]})
            start += len(texts)
        return out

    def _forward(self, records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]]) -> list[SlotScores]:
        critiques, counts = None, None
        if self.spec.kind == "critique":
            critiques = self._critiques(records, images)
            pairs = [critique_answers(r, c, self.spec.critique_separator, self.processor.tokenizer)
                     for r, c in zip(records, critiques)]
            records, counts = [p[0] for p in pairs], [p[1] for p in pairs]
        batch = reward_batch(self.layout, self.processor, records, images, self.max_length, counts)
        device, dtype = self.model.head.weight.device, self.model.backbone.dtype
        batch = {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            rewards = REWARD_LAYOUTS[self.layout][1](self.model, batch).rewards.tolist()
        generated = critiques if critiques is not None and self.critiques == "generate" else [None] * len(records)
        return [SlotScores(row[0], row[1: 1 + len(r.rejected)], c) for row, r, c in zip(rewards, records, generated)]

    def score_records(self, records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]]
                      ) -> list[SlotScores]:
        """Rewards of the chosen and every rejected answer of each record (``images[i]``: record i's images)."""
        out: list[SlotScores] = []
        for start in range(0, len(records), self.batch_size):
            out += self._forward(records[start: start + self.batch_size], images[start: start + self.batch_size])
        return out

    def score_answers(self, records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]],
                      answers: Sequence[Sequence[str]]) -> list[list[float]]:
        """One reward per answer of ``answers[i]`` (>= 1 answers) to the prompt of ``records[i]``."""
        if any(not group for group in answers):
            raise ValueError("every prompt needs at least one answer to score")
        rows = [dataclasses.replace(r, chosen=group[0], rejected=list(group[1:]), meta={})
                for r, group in zip(records, answers, strict=True)]
        return [[s.chosen, *s.rejected] for s in self.score_records(rows, images)]


def load_scorer(path: str | Path, *, device: Any = None, dtype: str | None = None, **settings: Any) -> RewardScorer:
    """A ``RewardScorer`` of the reward-model folder ``path`` on ``device``; ``settings`` as ``RewardScorer`` takes."""
    model, processor = load_reward_model(path, dtype=dtype, device=device)
    scorer = RewardScorer(model, processor, read_spec(path), **settings)
    logger.info("reward model %s (%s): layout %s", path, scorer.spec.kind, scorer.layout)
    return scorer

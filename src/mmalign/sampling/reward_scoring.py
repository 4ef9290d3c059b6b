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


@dataclass
class ScorerConfig:
    """How a reward model scores (``mmalign score``, ``mmalign eval rm``, the RM annotator)."""

    dtype: str | None = None  # model dtype: float32 / bfloat16 / float16 / auto (None: float32)
    # batch layout: prefix_cache / shared_prefix (image + prompt once per record), plain; auto picks the first exact
    forward: Literal["auto", "prefix_cache", "shared_prefix", "plain"] = "auto"
    max_length: int = 4096  # most tokens of prompt + answer (+ critique); longer records are errors
    critiques: CritiqueSource = "generate"  # critique models: write the critiques, or use meta.critiques
    critique_tokens: int = 128  # longest critique a critique model writes (greedy decoding)
    batch_size: int = 8  # records (prompts) per forward and per generate call
    seed: int = 0  # generation seed

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 1 or self.critique_tokens < 1:
            raise ValueError("batch_size, max_length and critique_tokens must be >= 1")


class RewardScorer:
    """A reward model ready to score with the settings of ``cfg`` (its ``forward`` layout resolved once, as
    trainers do, for prompts + answers up to ``max_length`` tokens)."""

    def __init__(self, model: ScalarHeadModel, processor: Any, spec: RewardModelSpec, cfg: ScorerConfig):
        self.model, self.processor, self.spec, self.cfg = model.eval(), processor, spec, cfg
        self.layout = resolve_layout(cfg.forward, model.backbone, cfg.max_length)
        self.params = GenerationParams(max_new_tokens=cfg.critique_tokens)

    def _critiques(self, records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]]
                   ) -> list[dict[str, Any]]:
        """Per record, ``{"chosen": c, "rejected": [c_k]}``: generated after ``answer + separator``, or given."""
        if self.cfg.critiques == "given":
            missing = [r.id for r in records if "critiques" not in r.meta]
            if missing:
                raise ValueError(f"critiques='given' needs meta.critiques on every record; missing on {missing[:3]}")
            return [r.meta["critiques"] for r in records]
        rows = [(i, answer) for i, r in enumerate(records) for answer in (r.chosen, *r.rejected)]
        written = generate(self.model.backbone, self.processor, [records[i].prompt for i, _ in rows],
                           [images[i] for i, _ in rows], self.params, seed=self.cfg.seed, batch_size=len(rows),
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
        batch = reward_batch(self.layout, self.processor, records, images, self.cfg.max_length, counts)
        device, dtype = self.model.head.weight.device, self.model.backbone.dtype
        batch = {k: v.to(device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            rewards = REWARD_LAYOUTS[self.layout][1](self.model, batch).rewards.tolist()
        generated = critiques if critiques is not None and self.cfg.critiques == "generate" else [None] * len(records)
        return [SlotScores(row[0], row[1: 1 + len(r.rejected)], c) for row, r, c in zip(rewards, records, generated)]

    def score_records(self, records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]]
                      ) -> list[SlotScores]:
        """Rewards of the chosen and every rejected answer of each record (``images[i]``: record i's images)."""
        out: list[SlotScores] = []
        size = self.cfg.batch_size
        for start in range(0, len(records), size):
            out += self._forward(records[start: start + size], images[start: start + size])
        return out

    def score_answers(self, records: Sequence[PreferenceRecord], images: Sequence[list[Image.Image]],
                      answers: Sequence[Sequence[str]]) -> list[list[float]]:
        """One reward per answer of ``answers[i]`` (>= 1 answers) to the prompt of ``records[i]``."""
        if any(not group for group in answers):
            raise ValueError("every prompt needs at least one answer to score")
        rows = [dataclasses.replace(r, chosen=group[0], rejected=list(group[1:]), meta={})
                for r, group in zip(records, answers, strict=True)]
        return [[s.chosen, *s.rejected] for s in self.score_records(rows, images)]


def load_scorer(path: str | Path, cfg: ScorerConfig | None = None, device: Any = None) -> RewardScorer:
    """A ``RewardScorer`` of the reward-model folder ``path`` on ``device`` with the settings ``cfg``.

    The RL trainers' reward source: ``load_scorer(path, ScorerConfig(...), device).score_answers(records, images,
    answers)`` -> one float per answer, ``answers[i]`` being any number (>= 1) of answers to ``records[i]``'s prompt.
    """
    cfg = cfg if cfg is not None else ScorerConfig()
    model, processor = load_reward_model(path, dtype=cfg.dtype, device=device)
    scorer = RewardScorer(model, processor, read_spec(path), cfg)
    logger.info("reward model %s (%s): layout %s", path, scorer.spec.kind, scorer.layout)
    return scorer

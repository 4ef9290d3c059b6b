"""Reward-model evaluation: accuracy on held-out preference pairs with bootstrap CIs, and the cross-set matrix.

Every (chosen, rejected_k) pair of the held-out records is a pair; it is ranked right when r(chosen) > r(rejected_k)
strictly (MM-RLHF-RewardBench, arXiv 2502.10391). A *sample* is one question on one image set: all pairs of the
records that share the prompt and images (one record with K rejected answers, or several records of one prompt
as VLFeedback-style sets have them). Metrics, each a ratio of sums over samples, so the bootstrap resamples
samples (``mmalign.evaluation.stats``):

- ``accuracy`` (MM-RLHF's ACC): pairs ranked right / pairs;
- ``accuracy_plus`` (ACC+): samples whose every pair is ranked right / samples;
- ``loss``: mean Bradley-Terry loss -log sigmoid(r+ - r-) over pairs; ``margin``: mean r+ - r- over pairs.

``evaluate_reward_model`` writes ``metrics.json`` and ``samples.jsonl`` (per sample: its pairs with both rewards and
the critiques a critique model wrote) into ``out_dir``. ``cross_set_matrix`` evaluates every reward model on every
held-out set (the analogue of Apple arXiv 2407.02477 Table 7: train on one pair source, test on each) and writes
``matrix.md`` / ``matrix.json``, one evaluation folder per cell.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.config import ConfigError, config_hash, save_config
from mmalign.data.io import write_jsonl
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord
from mmalign.evaluation.stats import MetricValue, bootstrap, ratio
from mmalign.sampling.reward_scoring import RewardScorer, ScorerConfig, SlotScores, load_scorer

logger = logging.getLogger(__name__)

METRICS_FILE, SAMPLES_FILE = "metrics.json", "samples.jsonl"
METRICS = {
    "accuracy": lambda s: ratio(s["correct"], s["pairs"]),
    "accuracy_plus": lambda s: ratio(s["all_correct"], s["samples"]),
    "loss": lambda s: ratio(s["loss"], s["pairs"]),
    "margin": lambda s: ratio(s["margin"], s["pairs"]),
}


@dataclass
class RewardEvalConfig:
    """Held-out preference records (``data``; at most ``max_records``, 0 = all) scored by the reward model
    ``model`` (a folder of ``mmalign train rm``) with the scorer settings of ``mmalign score``."""

    data: str = ""  # held-out preference records (.jsonl / .parquet), >= 1 rejected answer each
    data_root: str | None = None  # folder image paths are relative to (None: the data file's folder)
    model: str = ""  # reward-model folder (mmalign train rm: <output_dir>/reward_model)
    out_dir: str = "runs/eval_rm"  # receives metrics.json, samples.jsonl and config.yaml
    max_records: int = 0  # score the first records only (0: all)
    device: str = "cpu"  # where the model runs
    scorer: ScorerConfig = field(default_factory=ScorerConfig)  # layout, critiques (written or given), batch size
    n_boot: int = 1000  # bootstrap resamples (over samples) of each interval
    level: float = 0.95  # interval coverage
    seed: int = 0  # bootstrap seed

    def __post_init__(self) -> None:
        if self.max_records < 0 or self.n_boot < 1 or not 0 < self.level < 1:
            raise ValueError("max_records >= 0, n_boot >= 1 and 0 < level < 1 are required")


def _sample_key(record: PreferenceRecord) -> str:
    """Records asking the same question on the same images are one sample."""
    images = [hashlib.sha256(ref).hexdigest() if isinstance(ref, bytes) else ref for ref in record.images]
    return json.dumps([images, record.prompt], sort_keys=True)


def sample_rows(records: list[PreferenceRecord], scores: list[SlotScores]) -> list[dict[str, Any]]:
    """One row per sample (records grouped by prompt + images, first-seen order): its pairs and their sums."""
    groups: dict[str, list[tuple[PreferenceRecord, SlotScores]]] = {}
    for record, score in zip(records, scores, strict=True):
        groups.setdefault(_sample_key(record), []).append((record, score))
    rows = []
    for members in groups.values():
        pairs = [{"id": r.id, "slot": k + 1, "chosen_reward": s.chosen, "rejected_reward": rejected,
                  "correct": s.chosen > rejected} for r, s in members for k, rejected in enumerate(s.rejected)]
        gaps = [p["chosen_reward"] - p["rejected_reward"] for p in pairs]
        rows.append({
            "ids": [r.id for r, _ in members], "pairs_detail": pairs,
            "critiques": {r.id: s.critiques for r, s in members if s.critiques is not None} or None,
            "pairs": float(len(pairs)), "correct": float(sum(p["correct"] for p in pairs)),
            "all_correct": float(all(p["correct"] for p in pairs)), "samples": 1.0,
            "loss": float(sum(math.log1p(math.exp(-g)) if g > -30 else -g for g in gaps)), "margin": float(sum(gaps)),
        })
    return rows


def reward_metrics(rows: list[dict[str, Any]], *, n_boot: int, seed: int, level: float) -> dict[str, MetricValue]:
    """``METRICS`` with percentile bootstrap intervals over samples."""
    columns = {k: np.array([row[k] for row in rows]) for k in ("pairs", "correct", "all_correct", "samples", "loss",
                                                               "margin")}
    return bootstrap(columns, METRICS, n_boot=n_boot, seed=seed, level=level)


def evaluate_reward_model(cfg: RewardEvalConfig, scorer: RewardScorer | None = None) -> dict[str, Any]:
    """Score ``cfg.data`` with the reward model; writes metrics and per-sample rows; returns ``metrics.json``."""
    if not cfg.data or (scorer is None and not cfg.model):
        raise ConfigError("data (held-out preference records) and model (a reward-model folder) are required")
    dataset = RecordSet.at(cfg.data, cfg.data_root)
    records = dataset.read(min_rejected=1)
    records = records[: cfg.max_records] if cfg.max_records else records
    scorer = scorer if scorer is not None else load_scorer(cfg.model, cfg.scorer, cfg.device)
    scores = scorer.score_records(records, [dataset.images(r) for r in records])
    rows = sample_rows(records, scores)
    values = reward_metrics(rows, n_boot=cfg.n_boot, seed=cfg.seed, level=cfg.level)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    write_jsonl(out / SAMPLES_FILE, rows)
    result = {"model": cfg.model, "model_kind": scorer.spec.kind, "model_config_hash": scorer.spec.config_hash,
              "data": cfg.data, "config_hash": config_hash(cfg),
              "metrics": {name: v.to_json() for name, v in values.items()}}
    (out / METRICS_FILE).write_text(json.dumps(result, indent=2) + "\n")
    logger.info("reward model %s on %s: ACC %.3f, ACC+ %.3f (%d samples)", cfg.model, cfg.data,
                values["accuracy"].value, values["accuracy_plus"].value, len(rows))
    return result


@dataclass
class CrossSetConfig:
    """``models``: name -> reward-model folder (e.g. one per training pair source); ``sets``: name -> held-out
    record file; ``eval``: the per-cell settings (``data``, ``model`` and ``out_dir`` are filled in per cell)."""

    models: dict[str, str] = field(default_factory=dict)  # name -> reward-model folder (matrix rows)
    sets: dict[str, str] = field(default_factory=dict)  # name -> held-out record file (matrix columns)
    out_dir: str = "runs/rm_matrix"  # matrix.md / matrix.json and one evaluation folder per cell
    eval: RewardEvalConfig = field(default_factory=RewardEvalConfig)  # per-cell settings (data/model/out_dir set)


def _cell(value: dict[str, Any]) -> str:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return f"{fmt(value['value'])} [{fmt(value['ci_low'])}, {fmt(value['ci_high'])}]"


def matrix_table(matrix: dict[str, dict[str, dict[str, Any]]], metric: str) -> str:
    """Markdown table: one row per reward model, one column per held-out set, ``metric`` value [95% CI]."""
    sets = list(next(iter(matrix.values())))
    lines = [f"| {metric}: model \\ held-out set | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for name, row in matrix.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row[s]["metrics"][metric]) for s in sets) + " |")
    return "\n".join(lines) + "\n"


def cross_set_matrix(cfg: CrossSetConfig) -> dict[str, dict[str, dict[str, Any]]]:
    """Every model on every set (each cell skipped when its ``metrics.json`` exists); writes the tables."""
    if not cfg.models or not cfg.sets:
        raise ConfigError("models and sets must each name at least one entry (name: path)")
    out = Path(cfg.out_dir)
    save_config(cfg, out)
    matrix: dict[str, dict[str, dict[str, Any]]] = {}
    for name, model in cfg.models.items():
        scorer = None
        matrix[name] = {}
        for set_name, data in cfg.sets.items():
            cell = out / name / set_name
            if (cell / METRICS_FILE).is_file():
                matrix[name][set_name] = json.loads((cell / METRICS_FILE).read_text())
                continue
            run = dataclasses.replace(cfg.eval, data=data, model=model, out_dir=str(cell))
            scorer = scorer if scorer is not None else load_scorer(model, run.scorer, run.device)
            matrix[name][set_name] = evaluate_reward_model(run, scorer)
    (out / "matrix.json").write_text(json.dumps(matrix, indent=2) + "\n")
    (out / "matrix.md").write_text("\n".join(matrix_table(matrix, m) for m in ("accuracy", "accuracy_plus")))
    return matrix

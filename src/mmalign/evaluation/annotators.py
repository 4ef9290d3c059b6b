"""Annotator evaluation (Apple arXiv 2407.02477 Sec. 5.6, Table 10): accuracy on held-out preference pairs and
position bias.

Each record's chosen and first rejected answer go to the annotator as a two-answer group (chosen shown first).
Accuracy is the share of records where it prefers the chosen answer (a record without a preference counts as
wrong; the no-preference rate is reported too). For pairwise judges, which ask both orders, every single call
is also scored: ``position_bias`` is the share of parsed calls that picked "Response 1" (0.5 = unbiased; the
paper found "no noticeable bias"), ``order_consistency`` the share of records whose two calls agree on the
same answer, and ``call_accuracy`` the accuracy of single calls (a judge asked in one order only).
Writes ``metrics.json`` (value, n, bootstrap CI) and ``samples.jsonl`` (one verdict per record).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.config import ConfigError, config_hash, save_config
from mmalign.data.io import write_jsonl
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord
from mmalign.evaluation.stats import bootstrap, ratio
from mmalign.sampling.annotators import Annotation, Annotator, AnnotatorConfig, RolloutGroup, build_annotator

logger = logging.getLogger(__name__)

METRICS = {
    "accuracy": lambda s: ratio(s["correct"], s["records"]),
    "no_preference": lambda s: ratio(s["undecided"], s["records"]),
    "position_bias": lambda s: ratio(s["picked_first"], s["parsed_calls"]),
    "order_consistency": lambda s: ratio(s["consistent"], s["judged_records"]),
    "call_accuracy": lambda s: ratio(s["correct_calls"], s["parsed_calls"]),
}


@dataclass
class AnnotatorEvalConfig:
    """Held-out preference records (``data``, >= 1 rejected each), at most ``max_records`` of them (0 = all)."""

    data: str = ""
    data_root: str | None = None
    annotator: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    out_dir: str = "runs/eval_annotator"
    max_records: int = 0
    device: str = "cpu"
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_records < 0 or self.n_boot < 1:
            raise ValueError("max_records >= 0 and n_boot >= 1 are required")


def sample_row(record: PreferenceRecord, annotation: Annotation) -> dict[str, Any]:
    """Per-record outcome; ``calls`` holds each judge call's shown order ([0, 1] = chosen first) and pick."""
    calls = annotation.verdict.get("calls", [])
    picks = [c["shown"][c["pick"] - 1] for c in calls if c["pick"] is not None]  # answer index picked per call
    return {
        "id": record.id, "chosen_index": 0, "annotator_chosen": annotation.chosen, "verdict": annotation.verdict,
        "correct": float(annotation.chosen == 0), "undecided": float(not annotation.has_pair),
        "parsed_calls": float(len(picks)), "picked_first": float(sum(c["pick"] == 1 for c in calls)),
        "correct_calls": float(sum(p == 0 for p in picks)),
        "judged_records": float(len(picks) == 2), "consistent": float(len(picks) == 2 and picks[0] == picks[1]),
    }


def annotator_rows(annotator: Annotator, records: list[PreferenceRecord], dataset: RecordSet) -> list[dict[str, Any]]:
    """One ``sample_row`` per record, annotating chosen vs first rejected."""
    groups = [RolloutGroup(r, dataset.images(r), [r.chosen, r.rejected[0]]) for r in records]
    return [sample_row(r, a) for r, a in zip(records, annotator.annotate(groups))]


def evaluate_annotator(cfg: AnnotatorEvalConfig, annotator: Annotator | None = None) -> dict[str, Any]:
    """Score an annotator on ``cfg.data``; writes metrics and samples to ``cfg.out_dir``; returns the metrics."""
    if not cfg.data:
        raise ConfigError("data (held-out preference records) is required")
    dataset = RecordSet.at(cfg.data, cfg.data_root)
    records = dataset.read(min_rejected=1)
    records = records[: cfg.max_records] if cfg.max_records else records
    annotator = annotator if annotator is not None else build_annotator(cfg.annotator, cfg.device)
    rows = annotator_rows(annotator, records, dataset)
    columns = {k: np.array([r[k] for r in rows]) for k in rows[0] if isinstance(rows[0][k], float)}
    columns["records"] = np.ones(len(rows))
    values = bootstrap(columns, METRICS, n_boot=cfg.n_boot, seed=cfg.seed)
    metrics = {name: v.to_json() for name, v in values.items()}
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    write_jsonl(out / "samples.jsonl", rows)
    (out / "metrics.json").write_text(json.dumps({"annotator": annotator.name, "data": cfg.data,
                                                  "config_hash": config_hash(cfg), "metrics": metrics}, indent=2) + "\n")
    logger.info("annotator %s on %d records: accuracy %.3f", annotator.name, len(rows), metrics["accuracy"]["value"])
    return metrics

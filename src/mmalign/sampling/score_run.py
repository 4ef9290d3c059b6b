"""``mmalign score``: a record file in, the same records with reward-model margins per answer slot out.

Each output record gains ``meta.reward_margins`` (r(chosen) - r(rejected_k), one per rejected answer: the margin
MM-DPO's ``loss.dynamic_beta`` reads) and ``meta.rewards`` (``chosen``, ``rejected`` [K], ``scorer``: the hash of
this run's settings, and for a critique model that wrote its critiques, ``critiques``), replacing any earlier
values of those keys; the provenance sidecar names the reward model, its training config hash and the scoring
config. Resumable and sharded as ``mmalign.sampling.bdhs_run``: under ``accelerate launch`` each process scores
the records whose id hashes to it into its own shard; the main process merges them in input order. As BDHS, one
run at a time writes an output (``.<output name>.lock`` beside it, ``mmalign.runs``), and an output that is the
input file itself is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mmalign.config import ConfigError, config_hash, to_dict
from mmalign.data.io import same_file
from mmalign.data.record_files import write_records
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord, RecordError
from mmalign.models.heads import read_spec
from mmalign.progress import in_batches
from mmalign.runs import claim_output
from mmalign.sampling.reward_scoring import ScorerConfig, load_scorer
from mmalign.sampling.shards import ShardWriter, open_work_dir, owner, read_entries, work_dir_for

logger = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    """A record file scored by a reward model into another (``ScorerConfig``: how it scores)."""

    input: str = ""  # record file to score (.jsonl / .parquet), >= 1 rejected answer each
    output: str = ""  # record file to write: the input records with meta.reward_margins and meta.rewards
    model: str = ""  # reward-model folder (mmalign train rm: <output_dir>/reward_model)
    data_root: str | None = None  # folder image paths are relative to (None: the input's folder)
    device: str | None = None  # where the model runs (None: the accelerator's device)
    scorer: ScorerConfig = field(default_factory=ScorerConfig)  # layout, critiques, batch size, ...


def _fingerprint(cfg: ScoreConfig) -> dict[str, Any]:
    """What decides the results: input content, model folder and its spec, and every scoring setting."""
    return {"input_sha256": RecordSet.at(cfg.input, cfg.data_root).sha256(), "model": str(Path(cfg.model).resolve()),
            "spec": dataclasses.asdict(read_spec(cfg.model)), "scorer": to_dict(cfg.scorer)}


def scored_record(record: PreferenceRecord, entry: dict[str, Any], scorer_hash: str) -> PreferenceRecord:
    """``record`` with ``meta.reward_margins`` and ``meta.rewards`` from a shard entry."""
    rewards = {"chosen": entry["chosen"], "rejected": entry["rejected"], "scorer": scorer_hash}
    if entry["critiques"] is not None:
        rewards["critiques"] = entry["critiques"]
    margins = [entry["chosen"] - r for r in entry["rejected"]]
    return dataclasses.replace(record, meta=record.meta | {"reward_margins": margins, "rewards": rewards})


def _score_share(cfg: ScoreConfig, dataset: RecordSet, records: list[PreferenceRecord], accelerator: Accelerator,
                 work_dir: Path) -> None:
    done = read_entries(work_dir)
    mine = [r for r in records if owner(r.id, accelerator.num_processes) == accelerator.process_index
            and r.id not in done]
    logger.info("process %d: %d records to score (%d already done overall)", accelerator.process_index, len(mine),
                len(done))
    if not mine:
        return
    writer = ShardWriter(work_dir, accelerator.process_index)
    scorer = load_scorer(cfg.model, cfg.scorer, cfg.device or accelerator.device)
    for batch in in_batches(mine, cfg.scorer.batch_size, "score", enabled=accelerator.is_main_process,
                            unit="record"):
        scores = scorer.score_records(batch, [dataset.images(r) for r in batch])
        writer.append({"id": r.id, **dataclasses.asdict(s)} for r, s in zip(batch, scores))


def run_score(cfg: ScoreConfig) -> Path:
    """Score ``cfg.input`` into ``cfg.output`` (resuming a killed run from its shards); returns the output path."""
    if not cfg.input or not cfg.output or not cfg.model:
        raise ConfigError("input, output and model (a reward-model folder) are required")
    if same_file(cfg.output, cfg.input):
        raise ConfigError(f"output {cfg.output!r} is the input file itself; refusing to overwrite the data")
    output = Path(cfg.output)
    with claim_output(output.with_name(f".{output.name}.lock"), f"score output {cfg.output!r}"):
        return _run_score(cfg)


def _run_score(cfg: ScoreConfig) -> Path:
    accelerator = Accelerator()
    dataset = RecordSet.at(cfg.input, cfg.data_root)
    records = dataset.read(min_rejected=1)
    if not records:
        raise RecordError("no records to score", file=str(cfg.input))
    work_dir, fingerprint = work_dir_for(cfg.output), _fingerprint(cfg)
    open_work_dir(accelerator, work_dir, fingerprint)
    _score_share(cfg, dataset, records, accelerator, work_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        entries = read_entries(work_dir)
        scorer_hash = config_hash(cfg)
        out = [scored_record(r, entries[r.id], scorer_hash) for r in records]
        spec = fingerprint["spec"]
        write_records(cfg.output, out, provenance={
            "sampler": "reward_model_score", "input": cfg.input, "model": cfg.model, "model_kind": spec["kind"],
            "model_config_hash": spec["config_hash"], "config": to_dict(cfg), "config_hash": scorer_hash})
        shutil.rmtree(work_dir)
        logger.info("scored %d records with %s -> %s", len(out), cfg.model, cfg.output)
    accelerator.wait_for_everyone()
    return Path(cfg.output)

"""``mmalign score``: a record file in, the same records with reward-model margins per answer slot out.

Each output record gains ``meta.reward_margins`` (r(chosen) - r(rejected_k), one per rejected answer: the margin
MM-DPO's ``loss.dynamic_beta`` reads) and ``meta.rewards`` (``chosen``, ``rejected`` [K], ``scorer``: the hash of
this run's settings, and for a critique model that wrote its critiques, ``critiques``), replacing any earlier
values of those keys; the provenance sidecar names the reward model, its training config hash and the scoring
config. Resumable and sharded as ``mmalign.sampling.bdhs_run``: under ``accelerate launch`` each process scores
the records whose id hashes to it into its own shard; the main process merges them in input order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from accelerate import Accelerator

from mmalign.config import ConfigError, config_hash, to_dict
from mmalign.data.images import open_image
from mmalign.data.record_files import read_records, write_records
from mmalign.data.schema import PreferenceRecord, RecordError
from mmalign.models.heads import read_spec
from mmalign.sampling.reward_scoring import load_scorer
from mmalign.sampling.shards import ShardWriter, open_work_dir, owner, read_entries, work_dir_for

logger = logging.getLogger(__name__)


@dataclass
class ScoreConfig:
    """``input`` / ``output``: record files (.jsonl / .parquet; >= 1 rejected answer each); ``model``: a reward-model
    folder; ``data_root``: image root (None = the input's folder); ``forward``: batch layout ("auto": prefix_cache
    where exact, else shared_prefix); ``max_length``: bound on prompt + answer (+ critique) tokens; ``critiques``:
    "generate" (the model writes them) or "given" (``meta.critiques``), for critique models; ``critique_tokens``:
    the longest critique written; ``batch_size``: records per forward."""

    input: str = ""  # record file to score (.jsonl / .parquet), >= 1 rejected answer each
    output: str = ""  # record file to write: the input records with meta.reward_margins and meta.rewards
    model: str = ""  # reward-model folder (mmalign train rm: <output_dir>/reward_model)
    data_root: str | None = None  # folder image paths are relative to (None: the input's folder)
    dtype: str | None = None  # model dtype: float32 / bfloat16 / float16 / auto (None: float32)
    device: str | None = None  # where the model runs (None: the accelerator's device)
    # batch layout: prefix_cache / shared_prefix (image + prompt once per record), plain; auto picks the first exact
    forward: Literal["auto", "prefix_cache", "shared_prefix", "plain"] = "auto"
    max_length: int = 4096  # most tokens of prompt + answer (+ critique); longer records are errors
    critiques: Literal["generate", "given"] = "generate"  # critique models: write critiques, or use meta.critiques
    critique_tokens: int = 128  # longest critique a critique model writes
    batch_size: int = 8  # records per forward (and per shard append)
    seed: int = 0  # seeds critique generation (greedy unless the model's settings sample)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_length < 1 or self.critique_tokens < 1:
            raise ValueError("batch_size, max_length and critique_tokens must be >= 1")


def _fingerprint(cfg: ScoreConfig) -> dict[str, Any]:
    """What decides the results: input content, model folder and its spec, and every scoring setting."""
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("input", "output", "device")}
    return {"input_sha256": hashlib.sha256(Path(cfg.input).read_bytes()).hexdigest(),
            "model": str(Path(cfg.model).resolve()), "spec": dataclasses.asdict(read_spec(cfg.model)), **settings}


def scored_record(record: PreferenceRecord, entry: dict[str, Any], scorer_hash: str) -> PreferenceRecord:
    """``record`` with ``meta.reward_margins`` and ``meta.rewards`` from a shard entry."""
    rewards = {"chosen": entry["chosen"], "rejected": entry["rejected"], "scorer": scorer_hash}
    if entry["critiques"] is not None:
        rewards["critiques"] = entry["critiques"]
    margins = [entry["chosen"] - r for r in entry["rejected"]]
    return dataclasses.replace(record, meta=record.meta | {"reward_margins": margins, "rewards": rewards})


def _score_share(cfg: ScoreConfig, records: list[PreferenceRecord], accelerator: Accelerator,
                 work_dir: Path) -> None:
    done = read_entries(work_dir)
    mine = [r for r in records if owner(r.id, accelerator.num_processes) == accelerator.process_index
            and r.id not in done]
    logger.info("process %d: %d records to score (%d already done overall)", accelerator.process_index, len(mine),
                len(done))
    if not mine:
        return
    writer = ShardWriter(work_dir, accelerator.process_index)
    scorer = load_scorer(cfg.model, device=cfg.device or accelerator.device, dtype=cfg.dtype, layout=cfg.forward,
                         batch_size=cfg.batch_size, max_length=cfg.max_length, critiques=cfg.critiques,
                         critique_tokens=cfg.critique_tokens, seed=cfg.seed)
    root = Path(cfg.data_root) if cfg.data_root is not None else Path(cfg.input).parent
    for start in range(0, len(mine), cfg.batch_size):
        batch = mine[start: start + cfg.batch_size]
        scores = scorer.score_records(batch, [[open_image(ref, root) for ref in r.images] for r in batch])
        writer.append({"id": r.id, **dataclasses.asdict(s)} for r, s in zip(batch, scores))
        logger.info("process %d: %d / %d records", accelerator.process_index, start + len(batch), len(mine))


def run_score(cfg: ScoreConfig) -> Path:
    """Score ``cfg.input`` into ``cfg.output`` (resuming a killed run from its shards); returns the output path."""
    if not cfg.input or not cfg.output or not cfg.model:
        raise ConfigError("input, output and model (a reward-model folder) are required")
    accelerator = Accelerator()
    records = read_records(cfg.input, data_root=cfg.data_root, min_rejected=1)
    if not records:
        raise RecordError("no records to score", file=str(cfg.input))
    work_dir, fingerprint = work_dir_for(cfg.output), _fingerprint(cfg)
    open_work_dir(accelerator, work_dir, fingerprint)
    _score_share(cfg, records, accelerator, work_dir)
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

"""The BDHS file-to-file run: records in, preference records + provenance + acceptance summary out.

Resumable and sharded (``mmalign.sampling.shards``): under ``accelerate launch`` each process samples the
records whose id hashes to it and appends results to its own shard; after all processes finish, the main
process merges the shards, in input order, into the output file (the same bytes whatever the number of
processes, batch size or restarts), writes the provenance sidecar and ``<output>.summary.json`` (share of
records accepted at each iteration, the paper's Fig. 10), and removes the work folder.

Before sampling, every record is checked against the length it will reach: prompt (image tokens included) +
reference answer + the larger generation budget must fit ``max_length`` and the model's context. A longer
record is a ``RecordError`` (or, with ``skip_invalid_to``, listed and skipped), never a generation batch that
grows until memory runs out. One run at a time writes an output: ``.<output name>.lock`` beside it
(``mmalign.runs``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from mmalign.config import ConfigError
from mmalign.data.collate import collate_sft
from mmalign.data.io import same_file
from mmalign.data.record_files import write_records
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord, RecordError
from mmalign.models.loading import load_vlm
from mmalign.progress import in_batches
from mmalign.runs import claim_output
from mmalign.sampling.bdhs import BDHSConfig, BDHSResult, bdhs_drop_reason, bdhs_record, bdhs_sample, settings
from mmalign.sampling.shards import ShardWriter, open_work_dir, owner, read_entries, work_dir_for
from mmalign.sampling.similarity import SentenceSimilarity

logger = logging.getLogger(__name__)


@dataclass
class BDHSRunConfig:
    """``input``: record file (.jsonl/.parquet; ``chosen`` is the reference y+); ``output``: record file to
    write; ``model``: local policy folder (``load_vlm``); ``data_root``: image root (None = the input's folder);
    ``dtype``: model dtype for ``load_vlm`` (None = float32); ``bdhs``: the sampler (Algorithm 1);
    ``max_length``: most tokens of prompt (image tokens included) + reference answer + generation budget;
    ``skip_invalid_to``: JSONL file listing bad or too long records, which are then skipped (None: an error)."""

    input: str  # records to sample (.jsonl / .parquet); chosen is the reference answer y+
    output: str  # record file to write (chosen = reference, rejected = [BDHS answer, ...])
    model: str  # local policy folder
    data_root: str | None = None  # folder image paths are relative to (None: the input's folder)
    dtype: str | None = None  # model dtype (None: float32)
    bdhs: BDHSConfig = field(default_factory=BDHSConfig)
    max_length: int = 4096  # most tokens of prompt (image tokens included) + reference + generation budget
    skip_invalid_to: str | None = None  # list bad or too long records here and skip them (None: an error)

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")


def summary_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + ".summary.json")


def _fingerprint(cfg: BDHSRunConfig) -> dict[str, Any]:
    """What decides the results: input content, model folder, dtype and sampler settings."""
    return {"input_sha256": RecordSet.at(cfg.input, cfg.data_root).sha256(),
            "model": str(Path(cfg.model).resolve()), "dtype": cfg.dtype, "bdhs": settings(cfg.bdhs)}


def _length_errors(cfg: BDHSRunConfig, records: list[PreferenceRecord], processor: Any, context: int
                   ) -> list[RecordError]:
    """Records whose prompt + reference answer + generation budget exceed ``max_length`` or the model's context.

    A guided sentence is generated after the prompt and the reference's earlier sentences, the unguided answer
    after the prompt: both end below prompt + answer + the larger budget.
    """
    budget = max(cfg.bdhs.max_sentence_tokens, cfg.bdhs.max_answer_tokens)
    limit = min(cfg.max_length, context)
    dataset = RecordSet.at(cfg.input, cfg.data_root)
    errors = []
    for record in records:
        length = int(collate_sft(processor, [record], [dataset.images(record)])["attention_mask"].sum()) + budget
        if length > limit:
            errors.append(RecordError(
                f"prompt + reference answer + generation budget ({budget}) = {length} tokens, more than "
                f"{limit} (max_length {cfg.max_length}, model context {context}); shorten the record or lower "
                "bdhs.max_answer_tokens / bdhs.max_sentence_tokens", file=cfg.input,
                record_id=record.id, field="chosen"))
    return errors


def _read(cfg: BDHSRunConfig) -> tuple[list[PreferenceRecord], list[str]]:
    """The input's valid records and (with ``skip_invalid_to``) the JSON lines listing the invalid ones."""
    with tempfile.TemporaryDirectory() as tmp:  # one listing per process; the main one publishes it
        listing = Path(tmp) / "skipped.jsonl" if cfg.skip_invalid_to else None
        records = RecordSet.at(cfg.input, cfg.data_root).read(skip_invalid_to=listing)
        return records, listing.read_text().splitlines() if listing else []


def _fitting(cfg: BDHSRunConfig, records: list[PreferenceRecord], skipped: list[str], processor: Any,
             context: int, is_main: bool) -> list[PreferenceRecord]:
    """The records BDHS can sample within the length limit; a longer one raises, or with ``skip_invalid_to`` is
    listed there beside the invalid ones (``skipped``) and dropped."""
    errors = _length_errors(cfg, records, processor, context)
    if errors and not cfg.skip_invalid_to:
        raise errors[0]
    if cfg.skip_invalid_to and is_main:
        Path(cfg.skip_invalid_to).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.skip_invalid_to).write_text("".join(line + "\n" for line in skipped) + "".join(
            json.dumps(e.as_dict()) + "\n" for e in errors))
    too_long = {e.record_id for e in errors}
    if skipped or too_long:
        logger.warning("%s: skipped %d record(s), listed in %s", cfg.input, len(skipped) + len(too_long),
                       cfg.skip_invalid_to)
    return [r for r in records if r.id not in too_long]


def _sample_share(cfg: BDHSRunConfig, records: list[PreferenceRecord], accelerator: Accelerator,
                  work_dir: Path, model: Any, processor: Any) -> None:
    """Sample this process's unfinished records, one shard append per batch."""
    done = read_entries(work_dir)
    mine = [r for r in records if owner(r.id, accelerator.num_processes) == accelerator.process_index
            and r.id not in done]
    writer = ShardWriter(work_dir, accelerator.process_index)
    logger.info("process %d: %d records to sample (%d already done overall)", accelerator.process_index,
                len(mine), len(done))
    if not mine:
        return
    similarity = SentenceSimilarity(cfg.bdhs.embedder, accelerator.device)
    dataset = RecordSet.at(cfg.input, cfg.data_root)
    for batch in in_batches(mine, cfg.bdhs.batch_size, "BDHS", enabled=accelerator.is_main_process, unit="rec"):
        images = [dataset.images(r) for r in batch]
        results = bdhs_sample(model, processor, batch, images, cfg.bdhs, similarity)
        writer.append(asdict(result) for result in results)


def _summary(results: list[BDHSResult], dropped: dict[str, str], cfg: BDHSConfig) -> dict[str, Any]:
    """Acceptance per iteration (Fig. 10): share of records accepted at iteration i, and the share judged
    semantically different (phi < eps_s) after i iterations."""
    n = len(results)
    accepted = {i: sum(r.iteration == i for r in results) / n for i in range(1, cfg.n_iter + 1)}
    different = [r for r in results if r.similarity < cfg.similarity_threshold]
    cumulative = {i: sum(r.iteration <= i for r in different) / n for i in range(1, cfg.n_iter + 1)}
    return {
        "records": n, "written": n - len(dropped), "dropped": dropped,
        "accepted_at_iteration": accepted, "different_after_iteration": cumulative,
        "similar_after_last": 1.0 - len(different) / n,
        "truncated": sum(r.truncated for r in results),
        "mean_similarity": sum(r.similarity for r in results) / n, "mask": _mask_stats(results),
        "bdhs": settings(cfg),
    }


def _mask_stats(results: list[BDHSResult]) -> dict[str, float] | None:
    """Image tokens left visible by the masks of the kept answers (Eq. 6): mean, and the share of masks that
    hid every image token; None when the results predate the count."""
    known = [r for r in results if r.visible_tokens >= 0]
    if not known:
        return None
    return {"image_tokens_mean": sum(r.image_tokens for r in known) / len(known),
            "visible_tokens_mean": sum(r.visible_tokens for r in known) / len(known),
            "all_hidden_share": sum(r.visible_tokens == 0 for r in known) / len(known)}


def _merge(cfg: BDHSRunConfig, records: list[PreferenceRecord], work_dir: Path) -> dict[str, Any]:
    """Shards -> output records in input order, provenance sidecar and summary; returns the summary."""
    entries = read_entries(work_dir)
    missing = [r.id for r in records if r.id not in entries]
    if missing:
        raise RuntimeError(f"{work_dir}: no result for {len(missing)} record(s), e.g. {missing[:3]}")
    results = [BDHSResult(**entries[r.id]) for r in records]
    out, dropped = [], {}
    for record, result in zip(records, results):
        reason = bdhs_drop_reason(record, result.answer)
        if reason is None:
            out.append(bdhs_record(record, result, cfg.bdhs))
        else:
            dropped[record.id] = reason
    provenance = {"sampler": "bdhs", "input": cfg.input, "model": cfg.model, "dtype": cfg.dtype,
                  "config": asdict(cfg.bdhs), "settings_hash": settings(cfg.bdhs)["settings_hash"]}
    write_records(cfg.output, out, provenance=provenance)
    summary = _summary(results, dropped, cfg.bdhs)
    if summary["truncated"]:
        logger.warning("BDHS: %d of %d answers stopped at their token budget (bdhs.max_answer_tokens=%d, "
                       "bdhs.max_sentence_tokens=%d); they are marked meta.bdhs.truncated", summary["truncated"],
                       len(results), cfg.bdhs.max_answer_tokens, cfg.bdhs.max_sentence_tokens)
    summary_path(cfg.output).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary


def run_bdhs(cfg: BDHSRunConfig) -> dict[str, Any] | None:
    """Run BDHS over ``cfg.input`` into ``cfg.output``; resumes a killed run from its shards.

    Returns the summary on the main process (None on the others).
    """
    if same_file(cfg.output, cfg.input):
        raise ConfigError(f"output {cfg.output!r} is the input file itself; refusing to overwrite the data")
    output = Path(cfg.output)
    with claim_output(output.with_name(f".{output.name}.lock"), f"BDHS output {cfg.output!r}"):
        return _run_bdhs(cfg)


def _run_bdhs(cfg: BDHSRunConfig) -> dict[str, Any] | None:
    accelerator = Accelerator()
    records, skipped = _read(cfg)
    if not records:
        raise RecordError("no records to sample", file=str(cfg.input))
    model, processor = load_vlm(cfg.model, dtype=cfg.dtype, device=accelerator.device)
    records = _fitting(cfg, records, skipped, processor, model.config.get_text_config().max_position_embeddings,
                       accelerator.is_main_process)
    if not records:
        raise RecordError("no record fits the length limit", file=str(cfg.input))
    work_dir = work_dir_for(cfg.output)
    fingerprint = _fingerprint(cfg)
    open_work_dir(accelerator, work_dir, fingerprint)
    _sample_share(cfg, records, accelerator, work_dir, model, processor)
    accelerator.wait_for_everyone()
    summary = None
    if accelerator.is_main_process:
        summary = _merge(cfg, records, work_dir)
        shutil.rmtree(work_dir)
        logger.info("BDHS: wrote %d records to %s (%d dropped)", summary["written"], cfg.output,
                    len(summary["dropped"]))
    accelerator.wait_for_everyone()
    return summary

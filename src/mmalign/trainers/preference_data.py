"""Preference records for a trainer: read, check each against the model's processor, fingerprint.

Every record is collated alone in the trainer's batch layout before training starts, so a record the
processor refuses or that is longer than ``max_length`` (image tokens are never cut) is an error naming the
file, the record id and the field -- or, with ``skip_invalid_to``, a counted skip -- never a failure at
some later step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmalign.config import ConfigError
from mmalign.data.collate import SequenceTooLong
from mmalign.data.io import same_file
from mmalign.data.record_files import record_line
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord, RecordError

logger = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Preference records (``.jsonl``/``.parquet``) with >= 1 rejected answer each.

    ``skip_invalid_to``: a JSONL file that receives bad records (format errors, too long, refused by the
    processor) which are then skipped and counted; without it the first bad record is an error.
    """

    SHORTHAND: ClassVar[str] = "train"  # data=FILE sets data.train

    train: str = ""  # preference records (.jsonl / .parquet), >= 1 rejected answer each
    data_root: str | None = None  # folder image paths are relative to (None: the records file's folder)
    max_length: int = 2048  # most tokens of prompt (image tokens included) + answer; longer records are errors
    # JSONL file that receives bad records, which are then skipped (None: first bad one stops)
    skip_invalid_to: str | None = None

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ValueError(f"data.max_length must be >= 1, got {self.max_length}")


def record_set(cfg: DataConfig) -> RecordSet:
    """The training records with their image root (``data_root``, else the records file's folder)."""
    return RecordSet.at(cfg.train, cfg.data_root)


def slot_margins(records: list[PreferenceRecord], key: str, n_slots: int, device: Any) -> torch.Tensor:
    """float32[R, n_slots]: each record's ``meta[key]`` margins, one per rejected answer (0 past its last one)."""
    margins = torch.zeros(len(records), n_slots)
    for row, record in enumerate(records):
        margins[row, : len(record.rejected)] = torch.tensor(record.meta[key], dtype=torch.float32)
    return margins.to(device)


def _record_error(cfg: DataConfig, processor: Any, collate: Callable, record: PreferenceRecord, dataset: RecordSet,
                  margin_key: str | None, critiques: bool) -> RecordError | None:
    """Why ``record`` cannot train (collated alone by ``collate``), or None."""
    if critiques and "critiques" not in record.meta:  # its layout is checked on reading (schema)
        return RecordError("the critique reward model needs a critique of every answer", file=cfg.train,
                           record_id=record.id, field="meta.critiques")
    margins = record.meta.get(margin_key) if margin_key is not None else None
    if margin_key is not None and not (isinstance(margins, list) and len(margins) == len(record.rejected) and all(
            isinstance(m, (int, float)) and not isinstance(m, bool) for m in margins)):
        return RecordError(f"expected a list of {len(record.rejected)} margin(s), one per rejected answer (mmalign "
                           f"score writes them), got {margins!r}", file=cfg.train,
                           record_id=record.id, field=f"meta.{margin_key}")
    try:
        collate(processor, [record], [dataset.images(record)], cfg.max_length)
    except SequenceTooLong as err:
        return RecordError(str(err), file=cfg.train, record_id=record.id, field="max_length")
    except ValueError as err:  # the processor refuses the prompt/images (e.g. Qwen's aspect-ratio bound)
        return RecordError(f"the processor cannot encode this record: {err}", file=cfg.train,
                           record_id=record.id, field="images")
    return None


def load_pairs(cfg: DataConfig, processor: Any, collate: Callable, *, margin_key: str | None,
               is_main: bool, critiques: bool = False) -> tuple[list[PreferenceRecord], int]:
    """Read and check the preference records; returns (usable records, number skipped).

    ``collate``: the trainer's layout collate (processor, records, images, max_length) -> batch.
    ``margin_key``: the ``meta`` key every record needs its MM-DPO margins under, one number per rejected answer
    (None: not needed).
    Refused (or, with ``skip_invalid_to``, skipped and listed there by the main process): format errors
    incl. zero rejected answers, rejected == chosen and non-finite ``meta`` (``read_records``); a missing or
    non-numeric margin; with ``critiques``, a record without ``meta.critiques``; a prompt + answer longer than
    ``max_length``; a prompt or image the processor refuses. Errors name the file, line, record id and field.
    """
    if cfg.skip_invalid_to and same_file(cfg.skip_invalid_to, cfg.train):
        raise ConfigError(f"data.skip_invalid_to {cfg.skip_invalid_to!r} is the training file itself; the list of "
                          "bad records would overwrite the data")
    with tempfile.TemporaryDirectory() as tmp:  # one listing per process; the main one publishes it
        listing = Path(tmp) / "skipped.jsonl" if cfg.skip_invalid_to else None
        dataset = record_set(cfg)
        records = dataset.read(min_rejected=1, skip_invalid_to=listing)
        skipped = listing.read_text().splitlines() if listing else []
    kept = []
    for record in records:
        error = _record_error(cfg, processor, collate, record, dataset, margin_key, critiques)
        if error is None:
            kept.append(record)
            continue
        error = RecordError(error.reason, file=error.file, line=record_line(cfg.train, record.id),
                            record_id=error.record_id, field=error.field)
        if not cfg.skip_invalid_to:
            raise error
        skipped.append(json.dumps(error.as_dict()))
    if cfg.skip_invalid_to and is_main:
        Path(cfg.skip_invalid_to).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.skip_invalid_to).write_text("".join(line + "\n" for line in skipped))
    if skipped:
        logger.warning("%s: skipped %d record(s), listed in %s", cfg.train, len(skipped), cfg.skip_invalid_to)
    if not kept:
        raise ConfigError(f"{cfg.train}: no usable preference record ({len(skipped)} skipped)")
    return kept, len(skipped)


def data_fingerprint(cfg: DataConfig, records: list[PreferenceRecord], n_skipped: int) -> tuple[dict, list]:
    """(fingerprint dict of the training data, per-record image SHA-256 lists)."""
    dataset = record_set(cfg)
    image_hashes = [dataset.image_hashes(r) for r in records]
    digest = hashlib.sha256(json.dumps([[r.id for r in records], image_hashes]).encode()).hexdigest()
    file_digest = dataset.sha256()
    return {"train": cfg.train, "file_sha256": file_digest, "records_sha256": digest,
            "n_records": len(records), "n_skipped": n_skipped}, image_hashes

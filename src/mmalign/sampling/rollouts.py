"""Rollouts: k sampled answers per prompt from the current policy (Online-DPO, Apple arXiv 2407.02477 Sec. 2.3).

The online trainers call ``sample_rollouts`` between updates; annotators (``mmalign.sampling.annotators``)
then turn each prompt's k answers into a chosen / rejected pair. The k copies of a prompt are generated in
the same batched ``generate`` call, so one seed fixes all of them. The paper does not give k, the
temperature or the token budget (methods.md, Eq. 4 [U]); the defaults are RLOO's k = 4 at T = 1.0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from mmalign.data.record_files import record_to_json
from mmalign.data.schema import PreferenceRecord, check_fields
from mmalign.sampling.annotators import Annotation, Annotator, RolloutGroup
from mmalign.sampling.generate import GenerationParams, generate

logger = logging.getLogger(__name__)


@dataclass
class RolloutConfig:
    """k answers per prompt, sampled at ``temperature`` / ``top_p`` with at most ``max_new_tokens`` tokens.

    ``batch_size``: sequences per ``generate`` call (does not change which settings are used).
    """

    k: int = 4  # answers sampled per prompt
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_p: float = 1.0  # nucleus sampling threshold
    max_new_tokens: int = 64  # most tokens per answer
    batch_size: int = 32  # sequences per generate call (speed only)

    def __post_init__(self) -> None:
        if self.k < 2:
            raise ValueError(f"rollout.k must be >= 2 (a pair needs two answers), got {self.k}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0 (greedy answers are all the same), got {self.temperature}")
        GenerationParams(self.max_new_tokens, self.temperature, self.top_p)  # validates the rest


def rollout_seed(seed: int, step: int, record_ids: Sequence[str]) -> int:
    """A 63-bit generation seed from the run seed, the step and the prompts of the call."""
    blob = f"{seed}:{step}:" + "\x1f".join(record_ids)
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:8], "big") >> 1


def sample_rollouts(model: Any, processor: Any, records: Sequence[PreferenceRecord],
                    images: Sequence[list[Image.Image]], cfg: RolloutConfig, seed: int) -> list[list[str]]:
    """k answers for each record's prompt; returns ``answers[i]`` = the k answers of ``records[i]``.

    Generation runs under ``torch.no_grad`` (inside ``generate``) with whatever adapters ``model`` has
    enabled, i.e. from the current policy. The same (model, inputs, cfg, seed) give the same answers.
    """
    if len(records) != len(images):
        raise ValueError(f"{len(records)} records but {len(images)} image lists")
    params = GenerationParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    prompts = [r.prompt for r in records for _ in range(cfg.k)]
    row_images = [imgs for imgs in images for _ in range(cfg.k)]
    flat = generate(model, processor, prompts, row_images, params, seed=seed, batch_size=cfg.batch_size)
    answers = [flat[i * cfg.k:(i + 1) * cfg.k] for i in range(len(records))]
    distinct = sum(len(set(a)) for a in answers) / max(len(answers), 1)
    logger.debug("rollouts: %d prompts x %d, %.2f distinct answers per prompt", len(records), cfg.k, distinct)
    return answers


# --- one step of online pairs, stored on disk ----------------------------------------------------------------
# An online trainer pays for generation and annotation once per step: the pairs of step s are written to
# ``<pairs_dir>/step_<s>.jsonl`` before the update, and a resumed run reads them back instead of sampling
# and annotating again. Each line is one example of the global batch with its rollouts and the verdict.

Mode = Literal["online", "mixed", "online_bdhs"]


def step_file(pairs_dir: str | Path, step: int) -> Path:
    return Path(pairs_dir) / f"step_{step:08d}.jsonl"


def write_step(pairs_dir: str | Path, step: int, entries: list[dict[str, Any]]) -> Path:
    """Write one step's entries atomically (a kill mid-write leaves no partial step file)."""
    path = step_file(pairs_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
    os.replace(tmp, path)
    return path


def read_step(pairs_dir: str | Path, step: int) -> list[dict[str, Any]] | None:
    """The stored entries of ``step``, or None when that step was never annotated."""
    path = step_file(pairs_dir, step)
    if not path.is_file():
        return None
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def entry_pair(entry: dict[str, Any]) -> PreferenceRecord | None:
    """The training pair of a stored entry (None: the annotator gave no preference), checked like any record."""
    raw = entry["pair"]
    if raw is None:
        return None
    images = [base64.b64decode(ref["bytes"]) if isinstance(ref, dict) else ref for ref in raw["images"]]
    return check_fields(raw | {"images": images})


def takes_offline(seed: int, step: int, record_id: str, p: float) -> bool:
    """alpha ~ Bernoulli(p) of Mixed-DPO (Apple Eq. 4), drawn per example from (seed, step, record id)."""
    return random.Random(f"mix:{seed}:{step}:{record_id}").random() < p


def online_pair(record: PreferenceRecord, answers: list[str], annotation: Annotation, step: int,
                annotator: str) -> PreferenceRecord | None:
    """chosen = the annotator's preferred rollout, rejected = [its rejected rollout]."""
    if not annotation.has_pair or not answers[annotation.chosen].strip() or not answers[annotation.rejected].strip():
        return None  # no preference, or an empty answer (not a valid record text)
    meta = {k: v for k, v in record.meta.items() if k in ("objects", "task")}
    meta["online"] = {"step": step, "annotator": annotator, "source_id": record.id}
    return PreferenceRecord(f"{record.id}@{step}", list(record.images), record.prompt,
                            answers[annotation.chosen], [answers[annotation.rejected]], "online", meta)


def collect_online(model: Any, processor: Any, records: Sequence[PreferenceRecord],
                   images: Sequence[list[Image.Image]], annotator: Annotator, cfg: RolloutConfig, *, seed: int,
                   step: int) -> list[dict[str, Any]]:
    """Sample k rollouts per record from ``model``, annotate them, and return one entry per record."""
    if not records:
        return []
    answers = sample_rollouts(model, processor, records, images, cfg, rollout_seed(seed, step, [r.id for r in records]))
    groups = [RolloutGroup(r, imgs, a, salt=f"step{step}") for r, imgs, a in zip(records, images, answers)]
    entries = []
    for record, group, annotation in zip(records, groups, annotator.annotate(groups)):
        pair = online_pair(record, group.answers, annotation, step, annotator.name)
        entries.append({"record_id": record.id, "source": "online", "rollouts": group.answers,
                        "chosen": annotation.chosen, "rejected": annotation.rejected, "verdict": annotation.verdict,
                        "pair": None if pair is None else record_to_json(pair)})
    return entries


def offline_entry(record: PreferenceRecord) -> dict[str, Any]:
    """A Mixed-DPO example that takes the offline pair (its chosen and first rejected answer)."""
    if not record.rejected:
        raise ValueError(f"record {record.id!r}, field 'rejected': Mixed-DPO needs an offline rejected answer")
    pair = PreferenceRecord(record.id, list(record.images), record.prompt, record.chosen, record.rejected[:1],
                            record.source, record.meta)
    return {"record_id": record.id, "source": "offline", "pair": record_to_json(pair)}

"""Answer log-probs of a VLM: per token, summed per sequence, and split into chosen / K rejected.

Batches come from ``mmalign.data.collate`` (``labels`` = -100 except on answer tokens). Logits are computed
only where they are needed: the model's ``logits_to_keep`` takes a boolean [N, T] mask of the positions that
predict an answer token, so the [N, T, V] logit tensor of prompt and image positions is never built.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mmalign.data.collate import IGNORE_INDEX
from mmalign.models.lora import reference_model

logger = logging.getLogger(__name__)

# Collation bookkeeping that is not a model input.
_NON_MODEL_KEYS = ("labels", "row_record", "row_answer")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The batch entries the model's forward takes (everything but labels and row bookkeeping)."""
    return {k: v for k, v in batch.items() if k not in _NON_MODEL_KEYS}


def answer_token_logps(model: Any, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
    """Log-probs of the answer tokens under ``model``.

    Returns ``token_logps`` float32[N, T] (log p(input_ids[n, t] | input_ids[n, <t], images), zero where no
    answer token) and ``answer_mask`` bool[N, T] (= labels != -100). Logits are built only at the N_a positions
    ``t - 1`` that predict an answer token ``t``: [N_a, V] instead of [N, T, V].
    """
    labels = batch["labels"]
    answer_mask = labels != IGNORE_INDEX
    if bool(answer_mask[:, 0].any()):
        raise ValueError("an answer token at position 0 has no preceding context to predict it from")
    logits = model(**model_inputs(batch), logits_to_keep=predicting_positions(answer_mask), use_cache=False).logits
    return picked_token_logps(logits, labels, answer_mask), answer_mask


def predicting_positions(token_mask: Tensor) -> Tensor:
    """bool[N, T]: the positions ``t - 1`` whose logits predict a token ``t`` of ``token_mask`` bool[N, T]."""
    predicts = torch.zeros_like(token_mask)
    predicts[:, :-1] = token_mask[:, 1:]
    return predicts


def picked_token_logps(logits: Tensor, labels: Tensor, token_mask: Tensor) -> Tensor:
    """float32[N, T] log-probs of the tokens of ``token_mask`` bool[N, T] (0 elsewhere), from ``logits`` [N_a, V]
    kept at their ``predicting_positions`` (row-major, as ``logits_to_keep`` returns them); targets from labels."""
    logits = logits.float()  # log-softmax in float32 even under bf16 autocast
    targets = labels[token_mask]  # [N_a], same row-major order as the kept positions
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(dim=-1)
    token_logps = torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device)
    return token_logps.masked_scatter(token_mask, picked)


def sequence_logps(token_logps: Tensor, answer_mask: Tensor) -> Tensor:
    """Summed answer log-probs float[N] from token_logps float[N, T] and answer_mask bool[N, T]."""
    return (token_logps * answer_mask).sum(dim=-1)


class PreferenceForward(NamedTuple):
    """Log-probs of a preference batch of R records, K = the most rejected answers of any record.

    chosen_logps float[R]; rejected_logps float[R, K] (0 where absent); rejected_mask bool[R, K];
    chosen_lengths float[R], rejected_lengths float[R, K]: answer token counts;
    chosen_token_logps float[R, T], chosen_mask bool[R, T]: per-token values of the chosen rows (SFT term).
    """

    chosen_logps: Tensor
    rejected_logps: Tensor
    rejected_mask: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    chosen_token_logps: Tensor
    chosen_mask: Tensor


def preference_forward(model: Any, batch: Mapping[str, Any]) -> PreferenceForward:
    """One concatenated forward over the chosen and every rejected row of a ``collate_preference`` batch.

    The reference layout: each row carries its prompt and images again (``row_record`` [N] and ``row_answer``
    [N], 0 = chosen, j = j-th rejected, place the rows). Rows are scattered into [R] and [R, K] tensors.
    """
    token_logps, answer_mask = answer_token_logps(model, batch)
    logps = sequence_logps(token_logps, answer_mask)
    lengths = answer_mask.sum(dim=-1).to(logps.dtype)
    row_record, row_answer = batch["row_record"], batch["row_answer"]
    n_records, k = int(row_record.max()) + 1, int(row_answer.max())
    if k < 1:
        raise ValueError("a preference batch needs at least one rejected answer")
    is_chosen = row_answer == 0
    if int(is_chosen.sum()) != n_records:
        raise ValueError("every record of a preference batch needs exactly one chosen row")
    chosen_rows = row_record[is_chosen].argsort()  # chosen row of each record, by record index
    chosen_idx = torch.nonzero(is_chosen).squeeze(-1)[chosen_rows]
    rejected_logps = logps.new_zeros(n_records, k)
    rejected_lengths = logps.new_zeros(n_records, k)
    rejected_mask = torch.zeros(n_records, k, dtype=torch.bool, device=logps.device)
    rec, slot = row_record[~is_chosen], row_answer[~is_chosen] - 1
    rejected_logps = rejected_logps.index_put((rec, slot), logps[~is_chosen])
    rejected_lengths = rejected_lengths.index_put((rec, slot), lengths[~is_chosen])
    rejected_mask[rec, slot] = True
    return PreferenceForward(
        logps[chosen_idx], rejected_logps, rejected_mask, lengths[chosen_idx], rejected_lengths,
        token_logps[chosen_idx], answer_mask[chosen_idx],
    )


# --- reference log-probs cached on disk ------------------------------------------------------------------
# TRL refuses precomputed reference log-probs for image data; here each answer's reference log-prob is keyed
# by everything it depends on (model files, precision, image bytes, prompt, answer), so a cache is reused
# across runs and can never serve a value computed for other inputs.


def model_fingerprint(model_dir: str | Path, *settings: str) -> str:
    """SHA-256 over every file of a model directory (weights, config, processor) and ``settings``."""
    digest = hashlib.sha256()
    root = Path(model_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    for setting in settings:
        digest.update(setting.encode())
    return digest.hexdigest()


def answer_cache_key(model_fp: str, image_hashes: list[str], prompt: Any, answer: str) -> str:
    """Cache key of one answer's reference log-prob."""
    blob = json.dumps([model_fp, image_hashes, prompt, answer], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_logps_cache(path: str | Path) -> dict[str, float]:
    """``{key: summed log-prob}`` from a cache file (JSONL of {"key", "logps"}); empty if absent."""
    path = Path(path)
    if not path.exists():
        return {}
    lines = path.read_text().split("\n")
    if lines[-1]:
        logger.warning("%s: ignoring an unterminated last line (a writer was killed mid-line)", path)
    cache = {}
    for n, line in enumerate(lines[:-1], start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if not isinstance(entry.get("key"), str) or not math.isfinite(entry.get("logps", math.nan)):
            raise ValueError(f"{path}:{n}: a reference cache line needs a string 'key' and finite 'logps'")
        cache[entry["key"]] = float(entry["logps"])
    return cache


def append_logps_cache(path: str | Path, entries: dict[str, float]) -> None:
    """Append entries to a cache file (one JSON line each, so a killed writer loses at most its last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for key, value in entries.items():
            fh.write(json.dumps({"key": key, "logps": value}) + "\n")


# A reference: (collated batch, record indices) -> (ref chosen logps float[R], ref rejected logps float[R, K]).
RefFn = Callable[[dict[str, Any], list[int]], tuple[Tensor, Tensor]]


def live_reference(policy: Any, frozen: Any | None,
                   forward: Callable[[Any, Mapping[str, Any]], PreferenceForward] = preference_forward) -> RefFn:
    """Reference log-probs by a forward pass (``forward``: the batch layout's preference forward) of the frozen
    copy, or of the (PEFT) policy with its adapter disabled (``mmalign.models.lora.reference_model``)."""

    def reference(batch: dict[str, Any], _: list[int]) -> tuple[Tensor, Tensor]:
        with reference_model(policy, frozen) as model:
            out = forward(model, batch)
        return out.chosen_logps, out.rejected_logps

    return reference


def cached_reference(keys: list[list[str]], cache_path: str | Path,
                     compute: Callable[[list[int]], tuple[Tensor, Tensor]], accelerator: Any,
                     batch_size: int) -> RefFn:
    """Reference log-probs served from a cache file, computing only the misses first.

    keys: per record, the cache keys of its chosen and rejected answers (``answer_cache_key``).
    compute(indices) -> (chosen float[R], rejected float[R, K]) for those records. Misses are shared out over
    the accelerator's processes in batches of ``batch_size``, gathered, and appended to ``cache_path`` by the
    main process; the returned reference looks values up by record index.
    """
    from accelerate.utils import gather_object

    cache = load_logps_cache(cache_path)
    todo = [i for i, ks in enumerate(keys) if any(k not in cache for k in ks)]
    mine, new = todo[accelerator.process_index:: accelerator.num_processes], {}
    for start in range(0, len(mine), batch_size):
        chunk = mine[start: start + batch_size]
        chosen, rejected = compute(chunk)
        for row, i in enumerate(chunk):
            new[keys[i][0]] = float(chosen[row])
            new.update({key: float(rejected[row, j]) for j, key in enumerate(keys[i][1:])})
    merged = {k: v for part in gather_object([new]) for k, v in part.items()}
    if accelerator.is_main_process and merged:
        append_logps_cache(cache_path, merged)
    accelerator.wait_for_everyone()
    cache.update(merged)
    distinct = len({k for ks in keys for k in ks})
    logger.info("reference log-probs of %d distinct answers: %d computed, %d read from %s", distinct,
                len(merged), distinct - len(merged), cache_path)
    table = [[cache[k] for k in ks] for ks in keys]

    def reference(batch: dict[str, Any], indices: list[int]) -> tuple[Tensor, Tensor]:
        device = batch["input_ids"].device  # every layout's batch has input_ids; K is the batch's most rejected
        rejected = torch.zeros(len(indices), max(len(table[i]) - 1 for i in indices), device=device)
        for row, i in enumerate(indices):
            rejected[row, : len(table[i]) - 1] = torch.tensor(table[i][1:])
        return torch.tensor([table[i][0] for i in indices], device=device), rejected

    return reference

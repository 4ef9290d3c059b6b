"""Offline preference optimisation of a VLM: DPO / IPO / SLiC, MM-DPO beta, K rejected answers per chosen.

One recipe: ``OfflineConfig`` + ``train_offline(cfg)``. The loop is explicit, on ``accelerate`` (one process,
DDP, DeepSpeed or FSDP through ``accelerate launch``). Optimizer step ``s`` consumes the global batch
``batch_indices(n, batch_size, s - 1, seed)``; each process takes its share and splits it into
``grad_accum`` micro-batches, so micro-batch x accumulation x processes only changes how the same mean
loss is computed, and a resumed run continues with exactly the batches an uninterrupted run would see.

Batch layout (``forward``, ``mmalign.models.layouts``): ``prefix_cache`` (image and prompt once per record,
answers against the prompt's KV cache), ``shared_prefix`` (answers packed behind the prompt, block mask) or
``plain`` (one row per answer, the reference layout); all give the same log-probs and gradients. The default
``auto`` takes ``prefix_cache`` where it is exact for the model, else ``shared_prefix`` (logged at start).

Reference model (``mmalign.models.lora``): under LoRA the same weights with the adapter disabled, under full
fine-tuning a frozen copy. Optionally the reference log-probs are computed once and cached on disk, keyed
by model files + precision + image bytes + prompt + answer (``mmalign.models.logprobs``). With ``povid`` on,
POVID's teacher-forced answer under a noised image is one more rejected slot (``trainers.povid_slot``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mmalign.config import ConfigError, save_config
from mmalign.data.schema import PreferenceRecord, RecordError
from mmalign.models.layouts import PREFERENCE_LAYOUTS
from mmalign.models.logprobs import (
    PreferenceForward, RefFn, answer_cache_key, cached_reference, live_reference, model_fingerprint,
)
from mmalign.models.lora import prepare_policy, reference_model
from mmalign.objectives.preference import mm_dpo_beta
from mmalign.runs import claim_folder
from mmalign.sampling.povid import povid_rejected_logps
from mmalign.trainers.checkpoints import adapter_only_checkpoints, save_weights
from mmalign.trainers.common import (
    PreferenceRecipeConfig, accumulated_update, batch_indices, build_optimizer, build_scheduler, make_accelerator,
    micro_batch_size, process_slice, resume_step, run_steps, steps_per_epoch, trainer_layout,
)
from mmalign.trainers.povid_slot import PovidConfig, povid_batches, with_extra_rejected
from mmalign.trainers.preference_data import DataConfig, data_fingerprint, load_pairs, record_set, slot_margins
from mmalign.trainers.preference_loss import PAIR_STATS, PreferenceLossConfig, preference_metrics, record_losses

logger = logging.getLogger(__name__)

# Per-step sums reduced over micro-batches and processes; divided by their counts for logging.
_STATS = ("loss", "sft_nll", "beta", "n_records", "n_tokens", *PAIR_STATS)


@dataclass
class LossConfig(PreferenceLossConfig):
    """``PreferenceLossConfig`` plus MM-DPO beta and weights of the rejected slots.

    ``rejected_weights``: one weight per rejected slot (Apple Eq. 5; empty = equal weights).
    ``dynamic_beta``: beta per (chosen, rejected_k) pair from the k-th entry of ``meta[margin_key]``, a list
    with one reward-model margin per rejected answer as ``mmalign score`` writes it (MM-DPO; ``beta_w``,
    ``beta_k``).
    """

    # weight per rejected slot in the Apple Eq. 5 mean ([]: equal weights)
    rejected_weights: list[float] = field(default_factory=list)
    dynamic_beta: bool = False  # MM-DPO: beta per (chosen, rejected_k) pair from its margin in meta[margin_key]
    beta_w: float = 0.5  # MM-DPO w: how far beta may grow above loss.beta
    beta_k: float = 0.5  # MM-DPO k: how fast beta grows with the margin
    margin_key: str = "reward_margins"  # meta key with one reward margin per rejected answer (dynamic_beta)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 <= self.beta_w < math.inf and 0 < self.beta_k < math.inf):
            raise ValueError(f"MM-DPO needs finite beta_w >= 0 and beta_k > 0, got {self.beta_w}, {self.beta_k}")
        if not all(0 <= w < math.inf for w in self.rejected_weights) or (
                self.rejected_weights and not any(self.rejected_weights)):
            raise ValueError(f"loss.rejected_weights must be finite and >= 0 with at least one > 0, got "
                             f"{self.rejected_weights}")


@dataclass
class OfflineConfig(PreferenceRecipeConfig):
    """``PreferenceRecipeConfig`` plus the pairs, the loss and the optional POVID-style rejected slot (``povid``,
    weighted beside ``loss.rejected_weights`` in the Eq. 5 mean)."""

    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    povid: PovidConfig = field(default_factory=PovidConfig)
    # compute reference log-probs once and cache them in this folder (None: live reference)
    ref_cache_dir: str | None = None
    merge_weights: bool = False  # under LoRA, also save merged whole weights in merged/

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge_weights and not self.lora.enabled:
            raise ValueError("merge_weights needs lora.enabled (full fine-tuning already saves whole weights)")
        if self.loss.dynamic_beta and self.povid.enabled:
            raise ValueError("loss.dynamic_beta reads one reward margin per rejected answer of the records; the POVID "
                             "slot is made in the trainer and has none: turn one of them off")


# --- reference ---------------------------------------------------------------------------------------------


def reference_fn(cfg: OfflineConfig, accelerator: Accelerator, policy: Any, frozen: Any | None, processor: Any,
                 records: list[PreferenceRecord], image_hashes: list[list[str]], micro: int) -> RefFn:
    """The reference in the configured layout: a live forward pass, or (``ref_cache_dir``) log-probs computed
    once and looked up. ``policy`` is the unwrapped policy."""
    collate, forward = PREFERENCE_LAYOUTS[cfg.forward]
    live = live_reference(policy, frozen, forward)
    if not cfg.ref_cache_dir:
        return live
    fp = model_fingerprint(cfg.model.path, str(cfg.model.dtype), cfg.run.mixed_precision)
    keys = [[answer_cache_key(fp, image_hashes[i], r.prompt, a) for a in (r.chosen, *r.rejected)]
            for i, r in enumerate(records)]
    dataset = record_set(cfg.data)

    def compute(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate(processor, [records[i] for i in indices], [dataset.images(records[i]) for i in indices],
                        cfg.data.max_length)
        with accelerator.autocast():
            return live(_to_device(batch, accelerator.device), indices)

    return cached_reference(keys, Path(cfg.ref_cache_dir) / f"{fp[:16]}.jsonl", compute, accelerator, micro)


# --- one step ----------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the loop carries from step to step (``policy`` as prepared by accelerate, ``unwrapped`` inside it)."""

    cfg: OfflineConfig
    accelerator: Accelerator
    policy: Any
    unwrapped: Any
    frozen: Any | None
    processor: Any
    optimizer: Any
    scheduler: Any
    reference: RefFn
    records: list[PreferenceRecord]
    micro: int


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def _collate(run: _Run, indices: list[int]) -> tuple[dict[str, Any], tuple[dict, dict] | None]:
    """The micro-batch in the configured layout, and the POVID (clean, noisy) batches when ``povid.enabled``."""
    cfg, device = run.cfg, run.accelerator.device
    records = [run.records[i] for i in indices]
    images = [record_set(cfg.data).images(r) for r in records]
    batch = PREFERENCE_LAYOUTS[cfg.forward][0](run.processor, records, images, cfg.data.max_length)
    if not cfg.povid.enabled:
        return _to_device(batch, device), None
    clean, noisy = povid_batches(run.processor, records, images, cfg.povid.noise_steps, cfg.run.seed,
                                 cfg.data.max_length, clip=cfg.povid.noise_clip)
    return _to_device(batch, device), (_to_device(clean, device), _to_device(noisy, device))


def policy_and_reference(run: _Run, batch: dict[str, Any], povid: tuple[dict, dict] | None, indices: list[int]
                         ) -> tuple[PreferenceForward, torch.Tensor, torch.Tensor]:
    """Policy log-probs (``PreferenceForward``, K rejected slots, K + 1 with POVID) and the reference's
    (chosen float[R], rejected float[R, K(+1)]); the POVID slot is the last column (Apple Eq. 5 operand)."""
    out = PREFERENCE_LAYOUTS[run.cfg.forward][1](run.policy, batch)
    ref_chosen, ref_rejected = run.reference(batch, indices)
    if povid is not None:
        clean, noisy = povid
        out = with_extra_rejected(out, povid_rejected_logps(run.policy, clean, noisy))
        with reference_model(run.unwrapped, run.frozen) as ref:
            ref_povid = povid_rejected_logps(ref, clean, noisy)
        ref_rejected = torch.cat([ref_rejected, ref_povid.to(ref_rejected.dtype)[:, None]], dim=1)
    return out, ref_chosen, ref_rejected


def micro_loss(run: _Run, batch: dict[str, Any], povid: tuple[dict, dict] | None, indices: list[int]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over the micro-batch's R records and the sums of ``_STATS`` (float[len(_STATS)])."""
    cfg = run.cfg
    out, ref_chosen, ref_rejected = policy_and_reference(run, batch, povid, indices)
    chunk = [run.records[i] for i in indices]
    k = out.rejected_mask.shape[1] - int(povid is not None)  # the records' own rejected slots
    beta: float | torch.Tensor = cfg.loss.beta
    beta_sum = cfg.loss.beta * len(chunk)
    if cfg.loss.dynamic_beta:
        margins = slot_margins(chunk, cfg.loss.margin_key, k, out.chosen_logps.device)  # absent slots: masked out
        beta = mm_dpo_beta(cfg.loss.beta, margins, w=cfg.loss.beta_w, k=cfg.loss.beta_k)  # [R, K]
        present = out.rejected_mask.to(beta.dtype)
        beta_sum = ((beta * present).sum(dim=-1) / present.sum(dim=-1)).sum()  # per record: its pairs' mean
    slot_weights = (cfg.loss.rejected_weights[:k] or [1.0] * k) + ([cfg.povid.weight] if povid is not None else [])
    per_record, sft, pair_sums = record_losses(cfg.loss, out, ref_chosen, ref_rejected, slot_weights, beta)
    # tokens the model reads: prefix_cache batches hold the answers apart from the prompts
    n_tokens = batch["attention_mask"].sum() + (batch["answer_mask"].sum() if cfg.forward == "prefix_cache" else 0)
    values = [per_record.detach().sum(), sft.detach().sum(), beta_sum, len(chunk), n_tokens, *pair_sums]
    stats = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=per_record.device) for v in values])
    return per_record.mean(), stats


def train_step(run: _Run, step: int) -> dict[str, float]:
    """Optimizer step ``step`` (1-based): forward/backward over this process's micro-batches, then update."""
    cfg, acc = run.cfg, run.accelerator
    indices = process_slice(batch_indices(len(run.records), cfg.batch_size, step - 1, cfg.run.seed), acc)
    started = time.perf_counter()
    done, lr = accumulated_update(acc, run.policy, run.optimizer, run.scheduler, cfg.optim.max_grad_norm, indices,
                                  run.micro, lambda chunk: micro_loss(run, *_collate(run, chunk), chunk), len(_STATS),
                                  step)
    s = dict(zip(_STATS, done["sums"]))
    elapsed = time.perf_counter() - started
    return {**preference_metrics(s), "sft_nll": s["sft_nll"] / s["n_records"], "beta": s["beta"] / s["n_records"],
            "lr": lr, "grad_norm": done["grad_norm"], "tokens_per_s": s["n_tokens"] / elapsed}


# --- outputs and the loop ----------------------------------------------------------------------------------


def save_outputs(run: _Run, out: Path, fingerprint: dict) -> None:
    """Adapter (LoRA) or model (full FT) + processor, merged weights on request, config, data fingerprint."""
    acc, cfg = run.accelerator, run.cfg
    save_weights(acc, run.policy, run.processor, out, cfg.lora.enabled, cfg.merge_weights)
    if acc.is_main_process:
        save_config(cfg, out)
        (out / "data_fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    acc.wait_for_everyone()


def _adapter_saver(run: _Run):
    """Under LoRA, what writes a checkpoint's loadable ``adapter/`` (PEFT format + processor); else None."""
    if not run.cfg.lora.enabled:
        return None
    return lambda folder: save_weights(run.accelerator, run.policy, run.processor, folder, lora=True, merge=False)


def train_offline(cfg: OfflineConfig) -> Path:
    """Run offline preference optimisation; returns the output directory.

    ``run.output_dir`` receives ``adapter/`` (LoRA; PEFT format) or ``model/`` (full fine-tuning), each with
    the processor, ``merged/`` on request, ``config.yaml``, ``data_fingerprint.json``, ``metrics.jsonl``,
    ``tensorboard/`` and ``checkpoints/step_*`` (every ``run.save_every`` steps and the last one, each with a
    loadable ``adapter/`` under LoRA; ``run.resume`` continues from the newest intact one; see
    ``trainers.checkpoints``). A loss or gradient that turns non-finite stops the run (``TrainingStopped``).
    """
    if not cfg.model.path or not cfg.data.train:
        raise ConfigError("model.path and data.train are required")
    with claim_folder(cfg.run.output_dir):
        return _train_offline(cfg)


def _train_offline(cfg: OfflineConfig) -> Path:
    out = Path(cfg.run.output_dir)
    accelerator = make_accelerator(cfg.run, cfg.optim.grad_accum)
    micro = micro_batch_size(cfg, accelerator)
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader for DeepSpeed to read the size from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    policy, processor, frozen, projector = prepare_policy(cfg)
    cfg = dataclasses.replace(cfg, forward=trainer_layout(cfg.forward, policy, cfg.data.max_length, accelerator))
    records, n_skipped = load_pairs(cfg.data, processor, PREFERENCE_LAYOUTS[cfg.forward][0],
                                    margin_key=cfg.loss.margin_key if cfg.loss.dynamic_beta else None,
                                    is_main=accelerator.is_main_process)
    imageless = [r.id for r in records if not r.images]
    if cfg.povid.enabled and imageless:
        raise RecordError("povid.enabled needs an image to noise", file=cfg.data.train, record_id=imageless[0],
                          field="images")
    k = max(len(r.rejected) for r in records)
    if cfg.loss.rejected_weights and len(cfg.loss.rejected_weights) < k:
        raise ConfigError(f"loss.rejected_weights has {len(cfg.loss.rejected_weights)} weights; records hold up to {k}")
    fingerprint, image_hashes = data_fingerprint(cfg.data, records, n_skipped)
    per_epoch = steps_per_epoch(len(records), cfg.batch_size)  # also refuses a batch larger than the data
    total = cfg.max_steps or cfg.epochs * per_epoch
    if frozen is not None:
        frozen.to(accelerator.device)
    optimizer = build_optimizer(policy, cfg.optim, projector)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    if cfg.lora.enabled:
        adapter_only_checkpoints(accelerator, policy)
    unwrapped = accelerator.unwrap_model(policy)
    reference = reference_fn(cfg, accelerator, unwrapped, frozen, processor, records, image_hashes, micro)
    run = _Run(cfg, accelerator, policy, unwrapped, frozen, processor, optimizer, scheduler, reference, records,
               micro)
    start = resume_step(cfg.run, accelerator, scheduler, fingerprint)
    run_steps(accelerator, cfg, total, start, fingerprint, lambda step: train_step(run, step),
              f"{cfg.loss.name} ({len(records)} pairs)", "rewards/accuracies", scheduler=scheduler,
              save_adapter=_adapter_saver(run))
    save_outputs(run, out, fingerprint)
    logger.info("%s: %d steps on %d pairs (%d skipped) -> %s", cfg.loss.name, total, len(records), n_skipped, out)
    return out

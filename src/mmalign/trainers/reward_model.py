"""Reward-model training on a VLM: Bradley-Terry (Apple arXiv 2407.02477 Eq. 1) or MM-RLHF's critique-based reward
model (arXiv 2502.10391 Sec. 3.2, Eq. 2 + Eq. 3).

One recipe: ``RewardModelConfig`` + ``train_reward_model(cfg)``, an explicit loop on ``accelerate`` with the data
order, checkpoints and exact resume of the preference recipes (``mmalign.trainers.common``). The model is the
policy loaded as every recipe loads it (LoRA or full fine-tuning, vision tower frozen) with a linear head on the
final hidden state (``mmalign.models.heads.ScalarHeadModel``). The records are preference records (chosen + K
rejected answers); each (chosen, rejected_k) pair adds ``-log sigmoid(r+ - r-_k)`` and a record's loss is the mean
over its pairs. Every answer of a record is scored in one forward in the ``forward`` layout
(``mmalign.models.reward_forward``): with ``prefix_cache`` / ``shared_prefix`` the image and prompt are encoded
once per record.

Critique-based (``critique.enabled``): each answer is followed by ``critique.separator`` and its critique from
``meta.critiques``; the critique tokens are teacher-forced (Eq. 2, token-mean NLL, weight ``loss.critique_weight``)
and the reward is read after the critique (Eq. 3); at inference the model writes the critique itself
(``mmalign.sampling.reward_scoring``).

Output ``run.output_dir``: ``reward_model/`` (backbone weights or LoRA adapter, processor, head, spec; load with
``mmalign.models.heads.load_reward_model`` or score with ``mmalign score``), ``config.yaml``,
``data_fingerprint.json``, ``metrics.jsonl``, ``checkpoints/``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from mmalign.config import ConfigError, config_hash, save_config
from mmalign.data.schema import PreferenceRecord
from mmalign.models.heads import RewardModelSpec, ScalarHeadModel, write_head
from mmalign.models.lora import prepare_policy
from mmalign.models.reward_forward import REWARD_LAYOUTS, critique_answers, reward_batch
from mmalign.objectives.preference import combine_rejected
from mmalign.objectives.reward import bradley_terry, critique_nll
from mmalign.runs import claim_folder
from mmalign.trainers.checkpoints import adapter_only_checkpoints
from mmalign.trainers.common import (
    PreferenceRecipeConfig, accumulated_update, batch_indices, build_optimizer, build_scheduler, make_accelerator,
    micro_batch_size, process_slice, resume_step, run_steps, steps_per_epoch, trainer_layout,
)
from mmalign.trainers.preference_data import (
    DataConfig, data_fingerprint, load_pairs, record_set, slot_margins,
)

logger = logging.getLogger(__name__)

MODEL_DIR = "reward_model"
# Per-step sums reduced over micro-batches and processes; divided by their counts for logging.
_STATS = ("loss", "critique_nll", "chosen_reward", "rejected_reward", "margin", "accuracy", "n_pairs", "n_records",
          "n_tokens")


@dataclass
class RewardLossConfig:
    """``center``: TRL's ``center_rewards_coefficient`` (MM-RLHF: 0.01); ``margin_key``: a ``meta`` key of margins,
    one per rejected answer, subtracted inside the sigmoid (Llama 2 / TRL ``margin``; "" = none);
    ``critique_weight``: weight of the critique NLL when ``critique.enabled`` (MM-RLHF: 1.0)."""

    center: float = 0.0  # weight of mean((r+ + r-)^2), TRL's center_rewards_coefficient (MM-RLHF: 0.01)
    margin_key: str = ""  # meta key of margins (one per rejected answer) subtracted in the sigmoid ("": none)
    critique_weight: float = 1.0  # weight of the critique NLL (Eq. 2) beside the score loss (Eq. 3)

    def __post_init__(self) -> None:
        if self.center < 0 or self.critique_weight < 0:
            raise ValueError("loss.center and loss.critique_weight must be >= 0")


@dataclass
class CritiqueConfig:
    """MM-RLHF's critique-based reward model: ``enabled``; ``separator``: the text between an answer and its
    critique (the critique itself comes from ``meta.critiques`` of each record)."""

    enabled: bool = False  # train MM-RLHF's critique-based reward model (records need meta.critiques)
    separator: str = "\nCritique: "  # text between an answer and its critique (in the model's vocabulary)

    def __post_init__(self) -> None:
        if self.enabled and not self.separator:
            raise ValueError("critique.separator must not be empty")


@dataclass
class RewardModelConfig(PreferenceRecipeConfig):
    """``PreferenceRecipeConfig`` (model, lora, optim, run, batch_size, epochs, max_steps, forward) plus the pairs,
    the loss and the critique settings."""

    data: DataConfig = field(default_factory=DataConfig)  # preference records: chosen + >= 1 rejected each
    loss: RewardLossConfig = field(default_factory=RewardLossConfig)  # Bradley-Terry loss terms
    critique: CritiqueConfig = field(default_factory=CritiqueConfig)  # the critique-based variant


@dataclass
class _Run:
    """What the loop carries from step to step (``model``: the ``ScalarHeadModel`` as prepared by accelerate)."""

    cfg: RewardModelConfig
    accelerator: Accelerator
    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    records: list[PreferenceRecord]
    answers: list[tuple[PreferenceRecord, list[int] | None]]  # per record: what the model reads, critique tokens
    micro: int


def model_answers(record: PreferenceRecord, critique: CritiqueConfig, tokenizer: Any
                  ) -> tuple[PreferenceRecord, list[int] | None]:
    """The record as the model reads it, and its critique token counts (None for a Bradley-Terry model)."""
    if not critique.enabled:
        return record, None
    return critique_answers(record, record.meta["critiques"], critique.separator, tokenizer)


def micro_loss(run: _Run, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over the micro-batch's records and the sums of ``_STATS`` (float[len(_STATS)])."""
    cfg, device = run.cfg, run.accelerator.device
    chunk = [run.records[i] for i in indices]
    dataset = record_set(cfg.data)
    counts = [run.answers[i][1] for i in indices] if cfg.critique.enabled else None
    batch = reward_batch(cfg.forward, run.processor, [run.answers[i][0] for i in indices],
                         [dataset.images(r) for r in chunk], cfg.data.max_length, counts)
    batch = {k: v.to(device) for k, v in batch.items()}
    out = REWARD_LAYOUTS[cfg.forward][1](run.model, batch)
    k = out.rewards.shape[1] - 1
    mask = out.slot_mask[:, 1:]
    margin = slot_margins(chunk, cfg.loss.margin_key, k, device) if cfg.loss.margin_key else 0.0
    pair = bradley_terry(out.rewards[:, 0], out.rewards[:, 1:], margin=margin, center=cfg.loss.center)
    per_record = combine_rejected(pair.losses, mask, torch.ones(k, device=device))
    nll = critique_nll(out.critique_logps, out.critique_lengths, out.slot_mask) if cfg.critique.enabled \
        else torch.zeros_like(per_record)
    per_record = per_record + cfg.loss.critique_weight * nll
    maskf = mask.float()
    n_tokens = batch["attention_mask"].sum() + (batch["answer_mask"].sum() if cfg.forward == "prefix_cache" else 0)
    values = [per_record.detach().sum(), nll.detach().sum(), out.rewards[:, 0].detach().sum(),
              (out.rewards[:, 1:].detach() * maskf).sum(), (pair.margins * maskf).sum(),
              ((pair.margins > 0).float() * maskf).sum(), maskf.sum(), len(chunk), n_tokens]
    stats = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device) for v in values])
    return per_record.mean(), stats


def train_step(run: _Run, step: int) -> dict[str, float]:
    """Optimizer step ``step`` (1-based): forward/backward over this process's micro-batches, then update."""
    cfg, acc = run.cfg, run.accelerator
    indices = process_slice(batch_indices(len(run.records), cfg.batch_size, step - 1, cfg.run.seed), acc)
    started = time.perf_counter()
    done, lr = accumulated_update(acc, run.model, run.optimizer, run.scheduler, cfg.optim.max_grad_norm, indices,
                                  run.micro, lambda chunk: micro_loss(run, chunk), len(_STATS), step)
    s = dict(zip(_STATS, done["sums"]))
    n, r = s["n_pairs"], s["n_records"]
    return {"loss": s["loss"] / r, "critique_nll": s["critique_nll"] / r, "rewards/chosen": s["chosen_reward"] / r,
            "rewards/rejected": s["rejected_reward"] / n, "margin": s["margin"] / n, "accuracy": s["accuracy"] / n,
            "lr": lr, "grad_norm": done["grad_norm"], "tokens_per_s": s["n_tokens"] / (time.perf_counter() - started)}


def save_reward_weights(run: _Run, target: Path) -> None:
    """Backbone (whole weights, or the LoRA adapter) + processor + head + spec into ``target``; every process
    takes part (sharded state dicts are gathered)."""
    acc, cfg = run.accelerator, run.cfg
    state = acc.get_state_dict(run.model)
    unwrapped = acc.unwrap_model(run.model)
    backbone = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    unwrapped.backbone.save_pretrained(target, is_main_process=acc.is_main_process, save_function=acc.save,
                                       state_dict=backbone)
    if acc.is_main_process:
        run.processor.save_pretrained(target)
        spec = RewardModelSpec(kind="critique" if cfg.critique.enabled else "bradley_terry",
                               critique_separator=cfg.critique.separator if cfg.critique.enabled else "",
                               base_model=str(Path(cfg.model.path).resolve()) if cfg.lora.enabled else None,
                               config_hash=config_hash(cfg))
        write_head(target, state["head.weight"], spec)


def _build(cfg: RewardModelConfig, accelerator: Accelerator) -> tuple[ScalarHeadModel, Any, list[str], str]:
    """(reward model, processor, projector parameter names, resolved layout)."""
    backbone, processor, _, projector = prepare_policy(cfg, with_reference=False)
    layout = trainer_layout(cfg.forward, backbone, cfg.data.max_length, accelerator)
    model = ScalarHeadModel(backbone)  # head initialised from the run seed (make_accelerator seeds torch)
    return model.train(), processor, [f"backbone.{name}" for name in projector], layout


def train_reward_model(cfg: RewardModelConfig) -> Path:
    """Train a reward model; returns the output directory (see the module docstring). One run at a time per
    ``run.output_dir`` (``runs.claim_folder``); checkpoints every ``run.save_every`` steps and at the last, each
    with a loadable ``reward_model/`` under LoRA; a non-finite loss or gradient stops the run."""
    if not cfg.model.path or not cfg.data.train:
        raise ConfigError("model.path and data.train are required")
    with claim_folder(cfg.run.output_dir):
        return _train_reward_model(cfg)


def _train_reward_model(cfg: RewardModelConfig) -> Path:
    out = Path(cfg.run.output_dir)
    accelerator = make_accelerator(cfg.run, cfg.optim.grad_accum)
    micro = micro_batch_size(cfg, accelerator)
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader for DeepSpeed to read the size from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    model, processor, projector, layout = _build(cfg, accelerator)
    cfg = dataclasses.replace(cfg, forward=layout)
    collate = REWARD_LAYOUTS[cfg.forward][0]

    def check(proc: Any, records: list, images: list, max_length: int) -> Any:  # collated as training reads them
        return collate(proc, [model_answers(r, cfg.critique, proc.tokenizer)[0] for r in records], images, max_length)

    records, n_skipped = load_pairs(cfg.data, processor, check, margin_key=cfg.loss.margin_key or None,
                                    is_main=accelerator.is_main_process, critiques=cfg.critique.enabled)
    answers = [model_answers(r, cfg.critique, processor.tokenizer) for r in records]
    fingerprint, _ = data_fingerprint(cfg.data, records, n_skipped)
    per_epoch = steps_per_epoch(len(records), cfg.batch_size)  # also refuses a batch larger than the data
    total = cfg.max_steps or cfg.epochs * per_epoch
    optimizer = build_optimizer(model, cfg.optim, projector)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.lora.enabled:
        adapter_only_checkpoints(accelerator, model)
    run = _Run(cfg, accelerator, model, processor, optimizer, scheduler, records, answers, micro)
    start = resume_step(cfg.run, accelerator, scheduler, fingerprint)
    kind = "critique RM" if cfg.critique.enabled else "BT RM"
    run_steps(accelerator, cfg, total, start, fingerprint, lambda step: train_step(run, step),
              f"{kind} ({len(records)} records)", "accuracy", scheduler=scheduler,
              save_adapter=(lambda folder: save_reward_weights(run, folder / MODEL_DIR)) if cfg.lora.enabled else None)
    save_reward_weights(run, out / MODEL_DIR)
    if accelerator.is_main_process:
        save_config(cfg, out)
        (out / "data_fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    accelerator.wait_for_everyone()
    logger.info("%s: %d steps on %d records (%d skipped) -> %s", kind, total, len(records), n_skipped, out / MODEL_DIR)
    return out

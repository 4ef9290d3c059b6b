"""Supervised fine-tuning recipe: token-mean cross-entropy on answer tokens, explicit loop on accelerate.

A record trains every assistant answer it holds: the earlier assistant turns of a message prompt and
``chosen``, in one row (``collate_turns``; the conversation's images are encoded once), as TRL's
assistant-only loss does.

One optimizer step consumes the global batch ``batch_indices(n, batch_size, step, seed)``; each process
takes its slice and splits it into ``optim.grad_accum`` micro-batches. The loss of a micro-batch is its
summed answer-token negative log-likelihood divided by the number of answer tokens in the **whole global
batch** (known on every process from the records alone), scaled back up by the factor accelerate divides
by, so the gradient is the exact token mean over the global batch whatever the accumulation or process
count (invariant: 8 x 1 == 1 x 8).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from mmalign.config import ConfigError, save_config, to_dict
from mmalign.data.chat import answer_ids, earlier_answers
from mmalign.data.collate import collate_turns
from mmalign.data.record_set import RecordSet
from mmalign.data.schema import PreferenceRecord
from mmalign.models.loading import load_vlm, projector_param_names, vision_param_names
from mmalign.models.image_tokens import image_token_mask
from mmalign.models.logprobs import answer_token_logps, model_inputs
from mmalign.progress import progress
from mmalign.runs import claim_folder
from mmalign.sampling.masked import hide_image_attention
from mmalign.trainers.checkpoints import resume_from, step_checkpoint
from mmalign.trainers.common import (
    TRAINING_ALIASES, MetricsLogger, OptimConfig, RunConfig, batch_indices, build_optimizer, build_scheduler,
    make_accelerator, process_slice, steps_per_epoch, stop_if_not_finite,
)

logger = logging.getLogger(__name__)


# What a stage of a VLM recipe trains (LLaVA: projector alone to align, then projector + language model).
PARTS = ("vision", "projector", "language")


@dataclass
class SFTModelConfig:
    """The local model dir to fine-tune."""

    SHORTHAND: ClassVar[str] = "path"  # model=DIR sets model.path

    path: str = ""  # local model folder to fine-tune


@dataclass
class SFTDataConfig:
    """Records (``.jsonl`` / ``.parquet``; ``chosen`` and every earlier assistant turn of a message prompt are
    target answers); images relative to ``data_root`` (empty: the records file's folder)."""

    SHORTHAND: ClassVar[str] = "train"  # data=FILE sets data.train

    train: str = ""  # records (.jsonl / .parquet); chosen is the target answer
    data_root: str = ""  # folder image paths are relative to ("": the records file's folder)
    max_length: int = 128  # most tokens of a row: prompt (image tokens included) + every answer


@dataclass
class SFTConfig:
    """``image_dropout``: share of training examples whose image tokens are all hidden from attention (Eq. 6
    of Amirloo et al. 2024 with rho = 1, positions kept), drawn per (seed, step, record). The model then also
    learns each answer's text-only prior, which an LLM-initialised VLM brings from its language pre-training
    and a VLM trained from scratch lacks: without it, BDHS masking yields degenerate text instead of the
    model's language bias (docs/lab.md)."""

    ALIASES: ClassVar[dict[str, str]] = {**TRAINING_ALIASES, "max_steps": "steps"}

    model: SFTModelConfig = field(default_factory=SFTModelConfig)
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/sft"))
    batch_size: int = 32  # global batch per optimizer step: all processes x micro-batches
    steps: int = 1000  # optimizer steps
    image_dropout: float = 0.0  # share of examples trained with their image hidden (teaches the text-only prior)
    # parts that train (vision, projector, language); the others are frozen
    trainable: list[str] = field(default_factory=lambda: list(PARTS))

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 1:
            raise ValueError("batch_size and steps must be >= 1")
        if not self.trainable or set(self.trainable) - set(PARTS):
            raise ValueError(f"trainable: a non-empty subset of {list(PARTS)}, got {self.trainable}")
        if not 0.0 <= self.image_dropout <= 1.0:
            raise ValueError(f"image_dropout must be in [0, 1], got {self.image_dropout}")
        if self.batch_size % self.optim.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.optim.grad_accum}")


def set_trainable(model: torch.nn.Module, parts: list[str]) -> None:
    """``requires_grad`` on the parameters of the named ``PARTS``; everything else is frozen."""
    vision, projector = set(vision_param_names(model)), set(projector_param_names(model))
    for name, param in model.named_parameters():
        part = "vision" if name in vision else "projector" if name in projector else "language"
        param.requires_grad_(part in parts)


class _Images:
    """Decoded images of the records, each file opened once (a lab has one image per several records)."""

    def __init__(self, dataset: RecordSet):
        self.dataset, self.cache = dataset, {}

    def __call__(self, record: PreferenceRecord) -> list:
        out = []
        for ref in record.images:
            key = ref if isinstance(ref, str) else hash(ref)
            if key not in self.cache:
                self.cache[key] = self.dataset.open(ref)
            out.append(self.cache[key])
        return out


def answer_tokens(tokenizer, record: PreferenceRecord) -> int:
    """How many labelled tokens ``collate_turns`` gives the record: every answer's text + EOS."""
    return sum(len(answer_ids(tokenizer, a)) for a in [*earlier_answers(record.prompt), record.chosen])


def hidden_rows(seed: int, step: int, indices: list[int], rate: float) -> list[bool]:
    """Which examples of a micro-batch (record ``indices``) train with their image hidden at ``step``: a draw
    per (seed, step, record), so it does not depend on batch split, accumulation or process count."""
    return [rate > 0 and random.Random(f"{seed}:{step}:{i}").random() < rate for i in indices]


def _hide_images(model, batch: dict, hidden: list[bool]) -> dict:
    """``batch`` with every image token of the ``hidden`` rows masked out of attention (positions kept)."""
    counts = image_token_mask(model.config, batch["input_ids"]).sum(dim=-1).tolist()
    keeps = [torch.full((n,), not hide).numpy() for n, hide in zip(counts, hidden)]
    inputs = hide_image_attention(model, model_inputs(batch), keeps)
    return {**batch, **inputs}


def _micro_step(model, processor, accelerator, records, images, hidden: list[bool],
                scale: float, max_length: int) -> tuple[float, int]:
    """Forward/backward of one micro-batch; returns its summed answer NLL and answer-token count."""
    batch = collate_turns(processor, records, [images(r) for r in records], max_length)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    if any(hidden):
        batch = _hide_images(accelerator.unwrap_model(model), batch, hidden)
    with accelerator.accumulate(model):
        token_logps, answer_mask = answer_token_logps(model, batch)  # float32[B, T], bool[B, T]
        nll = -(token_logps * answer_mask).sum()
        # accelerate divides by grad_accum and DDP averages over processes; undo both so the gradient
        # is d(sum NLL / tokens in the global batch).
        accelerator.backward(nll * scale)
    return nll.item(), int(answer_mask.sum())


def train_sft(cfg: SFTConfig) -> Path:
    """Run SFT and save model + processor + resolved config into ``cfg.run.output_dir``; returns that dir."""
    if not cfg.data.train or not cfg.model.path:
        raise ConfigError("model.path and data.train are required: the model dir and the SFT records file")
    with claim_folder(cfg.run.output_dir):
        return _train_sft(cfg)


def _train_sft(cfg: SFTConfig) -> Path:
    out = Path(cfg.run.output_dir)
    accelerator = make_accelerator(cfg.run, cfg.optim.grad_accum)
    model, processor = load_vlm(cfg.model.path)
    model.train()
    set_trainable(model, cfg.trainable)
    dataset = RecordSet.at(cfg.data.train, cfg.data.data_root)
    records = dataset.read()
    steps_per_epoch(len(records), cfg.batch_size)  # refuses a batch larger than the data before any work
    images = _Images(dataset)
    n_answer = torch.tensor([answer_tokens(processor.tokenizer, r) for r in records])
    optimizer = build_optimizer(model, cfg.optim, projector_param_names(model))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    # The schedule counts optimizer steps of the global batch, so it is stepped here once per step rather
    # than prepared (a prepared scheduler steps once per process); checkpoints save it as JSON.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = resume_from(accelerator, out, scheduler) if cfg.run.resume else None
    start = state["step"] if state is not None else 0
    save_config(cfg, out)
    metrics = MetricsLogger(out, accelerator.is_main_process, cfg.run.report_to, resume_step=start,
                            config=to_dict(cfg))
    bar = progress(cfg.steps, "sft", initial=start, enabled=accelerator.is_main_process, unit="step")
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        indices = batch_indices(len(records), cfg.batch_size, step, cfg.run.seed)
        scale = cfg.optim.grad_accum * accelerator.num_processes / float(n_answer[indices].sum())
        mine = process_slice(indices, accelerator)
        micro = len(mine) // cfg.optim.grad_accum
        nll, tokens = 0.0, 0
        for k in range(cfg.optim.grad_accum):
            chunk = mine[k * micro:(k + 1) * micro]
            hidden = hidden_rows(cfg.run.seed, step, chunk, cfg.image_dropout)
            step_nll, step_tokens = _micro_step(model, processor, accelerator, [records[i] for i in chunk], images,
                                                hidden, scale, cfg.data.max_length)
            nll, tokens = nll + step_nll, tokens + step_tokens
        grad_norm = torch.tensor(0.0)
        if cfg.optim.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
            grad_norm = grad_norm if norm is None else norm
        stop_if_not_finite(accelerator, step + 1, {"loss": nll, "grad_norm": grad_norm})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        done = step + 1
        if done % cfg.run.log_every == 0 or done == cfg.steps:
            metrics.log(done, {"loss": nll / tokens, "lr": scheduler.get_last_lr()[0],
                               "step_s": time.perf_counter() - t0})
        step_checkpoint(accelerator, cfg.run, done, cfg.steps, {}, scheduler=scheduler)
        bar.update(1)
    bar.close()
    metrics.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out)
        processor.save_pretrained(out)
    return out

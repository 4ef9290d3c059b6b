"""Vision pre-training by multi-label image tagging: a VLM's vision side learns which labels an image shows.

The analogue of the pre-training a real VLM's vision encoder gets before it meets the language model (CLIP's
contrastive training, or the classification pre-training of earlier encoders; LLaVA starts from such an
encoder). The features trained are exactly the ones the language model reads: ``model.get_image_features``
(the vision tower at the VLM's feature layer, then the projector), ``float[B, N_img, D]``. Two linear heads
give one logit per label, both trained with binary cross-entropy against the record's label set (their sum):
- pooled: on the mean and the max of the features over the ``N_img`` tokens (learns fast);
- per token: each token's own logits, max-pooled over the tokens (multiple-instance learning), so that one
  token must carry a whole label (a "red circle", not "red" in one token and "circle" in another): what a
  language model needs to answer "Is there a red circle?" by attending to single image tokens.
The language model is neither trained nor run.

Data: records with exactly one image and a label list in ``meta[<labels_key>]``; records sharing an image are
taken once. Exact resume as the other recipes (``batch_indices`` is a pure function of seed and step). The
trained VLM is saved whole (``save_pretrained``) with the head (``tagging_head.safetensors``) and its label vocabulary
(``tagging_labels.json``) beside it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from mmalign.config import ConfigError, save_config, to_dict
from mmalign.data.images import open_image
from mmalign.data.record_files import read_records
from mmalign.data.schema import RecordError
from mmalign.models.loading import load_vlm, projector_param_names, vision_param_names
from mmalign.progress import progress
from mmalign.runs import claim_folder
from mmalign.trainers.checkpoints import resume_from, step_checkpoint
from mmalign.trainers.common import (
    MetricsLogger, OptimConfig, RunConfig, batch_indices, build_optimizer, build_scheduler,
    make_accelerator, process_slice, steps_per_epoch, stop_if_not_finite,
)

logger = logging.getLogger(__name__)

HEAD_FILE = "tagging_head.safetensors"
LABELS_FILE = "tagging_labels.json"


@dataclass
class TaggingDataConfig:
    """Training (and optional held-out) records; images relative to ``data_root`` (empty: each file's folder)."""

    train: str = ""  # records with one image each and a label list in meta
    eval: str = ""  # held-out records scored at the end ("": none)
    data_root: str = ""  # folder image paths are relative to ("": each records file's folder)
    labels_key: str = "objects"  # the meta field holding a record's labels


@dataclass
class TaggingConfig:
    """``model``: a local VLM dir; ``train_projector``: train the projector with the tower (else tower only)."""

    model: str = ""  # local VLM folder
    data: TaggingDataConfig = field(default_factory=TaggingDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_ratio=0.05))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/tagging"))
    batch_size: int = 32  # global batch of images per optimizer step
    steps: int = 1000  # optimizer steps
    train_projector: bool = True  # train the projector with the tower (else the tower alone)
    eval_batch_size: int = 64  # batch size of the held-out scoring

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.steps < 1 or self.eval_batch_size < 1:
            raise ValueError("batch_size, steps and eval_batch_size must be >= 1")
        if self.batch_size % self.optim.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.optim.grad_accum}")


class Tagger(torch.nn.Module):
    """A VLM's image features with two linear multi-label heads: on pooled features and per token."""

    def __init__(self, vlm: Any, n_labels: int):
        super().__init__()
        self.vlm = vlm
        hidden = vlm.config.get_text_config().hidden_size
        self.head = torch.nn.Linear(2 * hidden, n_labels)
        self.token_head = torch.nn.Linear(hidden, n_labels)

    def forward(self, image_inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``image_inputs``: the image processor's tensors for B images -> (pooled-head logits, per-token-head
        logits max-pooled over tokens), each ``float[B, L]``."""
        features = self.vlm.get_image_features(**image_inputs).pooler_output
        # one [N_i, D] (or [1, N_i, D]) per image, whatever the family
        tokens = [f.reshape(-1, f.shape[-1]).to(self.head.weight.dtype) for f in features]
        pooled = torch.stack([torch.cat([t.mean(0), t.amax(0)]) for t in tokens])
        per_token = torch.stack([self.token_head(t).amax(0) for t in tokens])
        return self.head(pooled), per_token


def tagging_examples(path: str | Path, data_root: str, labels_key: str) -> list[tuple[str | bytes, list[str]]]:
    """(image reference, labels) per distinct image of a record file; a record without one image or with a
    label list that is not a list of strings is an error naming it."""
    examples, seen = [], {}
    for record in read_records(path, data_root=data_root or None):
        labels = record.meta.get(labels_key)
        if len(record.images) != 1:
            raise RecordError(f"needs exactly one image, has {len(record.images)}", file=str(path),
                              record_id=record.id, field="images")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise RecordError(f"meta.{labels_key} must be a list of label strings, got {labels!r}",
                              file=str(path), record_id=record.id, field=f"meta.{labels_key}")
        ref = record.images[0]
        key = ref if isinstance(ref, str) else hash(ref)
        if key in seen:
            if sorted(seen[key]) != sorted(labels):
                raise RecordError(f"same image as an earlier record but other labels {labels}", file=str(path),
                                  record_id=record.id, field=f"meta.{labels_key}")
            continue
        seen[key] = labels
        examples.append((ref, labels))
    return examples


def _targets(examples: list[tuple[Any, list[str]]], vocab: list[str]) -> Tensor:
    """Multi-hot ``float[N, L]`` of the examples' labels over ``vocab``."""
    index = {label: i for i, label in enumerate(vocab)}
    out = torch.zeros(len(examples), len(vocab))
    for row, (_, labels) in enumerate(examples):
        out[row, [index[x] for x in labels]] = 1.0
    return out


def _image_inputs(processor: Any, refs: list, root: Path, device: torch.device) -> dict[str, Tensor]:
    images = [open_image(ref, root) for ref in refs]
    encoded = processor.image_processor(images, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items() if isinstance(v, Tensor)}


def tagging_scores(logits: Tensor, targets: Tensor) -> dict[str, float]:
    """Thresholded at 0: exact-set accuracy, label recall and precision over all images."""
    pred = logits > 0
    truth = targets > 0.5
    hits = (pred & truth).sum().item()
    return {"exact": (pred == truth).all(dim=1).float().mean().item(),
            "recall": hits / max(truth.sum().item(), 1), "precision": hits / max(pred.sum().item(), 1)}


@torch.no_grad()
def evaluate_tagger(tagger: Tagger, processor: Any, examples: list, vocab: list[str], root: Path,
                    batch_size: int) -> dict[str, float]:
    """``tagging_scores`` of the pooled head, and of the per-token head (keys ``token_*``)."""
    tagger.eval()
    device = tagger.head.weight.device
    heads = [tagger(_image_inputs(processor, [ref for ref, _ in examples[i:i + batch_size]], root, device))
             for i in range(0, len(examples), batch_size)]
    tagger.train()
    # labels the training set never showed count as missed: their logits are -inf
    unseen = sorted({x for _, labels in examples for x in labels} - set(vocab))
    targets = _targets(examples, vocab + unseen)
    pooled, per_token = (torch.cat([torch.cat(h).float().cpu(), torch.full((len(examples), len(unseen)), -math.inf)],
                                   dim=1) for h in zip(*heads))
    return tagging_scores(pooled, targets) | {f"token_{k}": v for k, v in tagging_scores(per_token, targets).items()}


def _trainable(tagger: Tagger, train_projector: bool) -> list[str]:
    """Freeze everything but the vision tower (+ projector) and the head; returns the projector's names."""
    vlm = tagger.vlm
    keep = set(vision_param_names(vlm)) | (set(projector_param_names(vlm)) if train_projector else set())
    for name, param in vlm.named_parameters():
        param.requires_grad_(name in keep)
    return [f"vlm.{n}" for n in projector_param_names(vlm)]


def train_tagging(cfg: TaggingConfig) -> Path:
    """Train; save the VLM, the head and its labels into ``run.output_dir``; returns that dir."""
    if not cfg.model or not cfg.data.train:
        raise ConfigError("model and data.train are required")
    with claim_folder(cfg.run.output_dir):
        return _train_tagging(cfg)


def _train_tagging(cfg: TaggingConfig) -> Path:
    out = Path(cfg.run.output_dir)
    accelerator = make_accelerator(cfg.run, cfg.optim.grad_accum)
    vlm, processor = load_vlm(cfg.model)
    root = Path(cfg.data.data_root or Path(cfg.data.train).parent)
    examples = tagging_examples(cfg.data.train, cfg.data.data_root, cfg.data.labels_key)
    steps_per_epoch(len(examples), cfg.batch_size)  # refuses a batch larger than the data before any work
    vocab = sorted({x for _, labels in examples for x in labels})
    targets = _targets(examples, vocab)
    tagger = Tagger(vlm.train(), len(vocab))
    optimizer = build_optimizer(tagger, cfg.optim, _trainable(tagger, cfg.train_projector))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    tagger, optimizer = accelerator.prepare(tagger, optimizer)
    state = resume_from(accelerator, out, scheduler) if cfg.run.resume else None
    start = state["step"] if state is not None else 0
    save_config(cfg, out)
    metrics = MetricsLogger(out, accelerator.is_main_process, cfg.run.report_to, resume_step=start,
                            config=to_dict(cfg))
    bar = progress(cfg.steps, "tagging", initial=start, enabled=accelerator.is_main_process, unit="step")
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        mine = process_slice(batch_indices(len(examples), cfg.batch_size, step, cfg.run.seed), accelerator)
        micro = len(mine) // cfg.optim.grad_accum
        total = 0.0
        for k in range(cfg.optim.grad_accum):
            chunk = mine[k * micro:(k + 1) * micro]
            inputs = _image_inputs(processor, [examples[i][0] for i in chunk], root, accelerator.device)
            with accelerator.accumulate(tagger), accelerator.autocast():
                truth = targets[chunk].to(accelerator.device)
                # mean over the chunk's label cells per head; equal micro-batches make the accumulated mean exact
                loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), truth)
                           for logits in tagger(inputs))
                accelerator.backward(loss)
            total += loss.item() / cfg.optim.grad_accum
        grad_norm = torch.tensor(0.0)
        if cfg.optim.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(tagger.parameters(), cfg.optim.max_grad_norm)
            grad_norm = grad_norm if norm is None else norm
        stop_if_not_finite(accelerator, step + 1, {"loss": total, "grad_norm": grad_norm})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        done = step + 1
        if done % cfg.run.log_every == 0 or done == cfg.steps:
            metrics.log(done, {"loss": total, "lr": scheduler.get_last_lr()[0], "step_s": time.perf_counter() - t0})
        step_checkpoint(accelerator, cfg.run, done, cfg.steps, {}, scheduler=scheduler)
        bar.update(1)
    bar.close()
    unwrapped = accelerator.unwrap_model(tagger)
    if cfg.data.eval and accelerator.is_main_process:
        held_out = tagging_examples(cfg.data.eval, cfg.data.data_root, cfg.data.labels_key)
        scores = evaluate_tagger(unwrapped, processor, held_out, vocab,
                                 Path(cfg.data.data_root or Path(cfg.data.eval).parent), cfg.eval_batch_size)
        metrics.log(cfg.steps, {f"eval/{k}": v for k, v in scores.items()})
        (out / "tagging_eval.json").write_text(json.dumps({"n": len(held_out), **scores}, indent=1) + "\n")
    metrics.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped.vlm.save_pretrained(out)
        processor.save_pretrained(out)
        heads = {f"{name}.{k}": v.contiguous() for name in ("head", "token_head")
                 for k, v in getattr(unwrapped, name).state_dict().items()}
        save_file(heads, str(out / HEAD_FILE))
        (out / LABELS_FILE).write_text(json.dumps(vocab) + "\n")
    return out

"""Offline preference optimisation of a VLM: DPO / IPO / SLiC, MM-DPO beta, K rejected answers per chosen.

One recipe: ``OfflineConfig`` + ``train_offline(cfg)``. The loop is explicit, on ``accelerate`` (one process,
DDP, DeepSpeed or FSDP through ``accelerate launch``). Optimizer step ``s`` consumes the global batch
``batch_indices(n, batch_size, s - 1, seed)``; each process takes its share and splits it into
``grad_accum`` micro-batches, so micro-batch x accumulation x processes only changes how the same mean
loss is computed, and a resumed run continues with exactly the batches an uninterrupted run would see.

Reference model: under LoRA the same weights with the adapter disabled (no second copy; the projector is
trained through PEFT ``modules_to_save``, whose original stays in place for the reference); under full
fine-tuning a frozen copy. Optionally the reference log-probs are computed once and cached on disk, keyed
by model files + precision + image bytes + prompt + answer (``mmalign.models.logprobs``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator

from mmalign.config import ConfigError, save_config
from mmalign.data.collate import SequenceTooLong, collate_preference
from mmalign.data.images import image_sha256, open_image
from mmalign.data.schema import PreferenceRecord, RecordError, read_records
from mmalign.models.loading import PROJECTOR_MODULES, freeze_vision_tower, load_vlm, projector_param_names
from mmalign.models.logprobs import (
    RefFn, answer_cache_key, cached_reference, live_reference, model_fingerprint, preference_forward,
)
from mmalign.objectives.preference import PREFERENCE_LOSSES, PreferenceLogps, combine_rejected, mm_dpo_beta, sft_nll
from mmalign.trainers.common import (
    MetricsLogger, OptimConfig, RunConfig, batch_indices, build_optimizer, build_scheduler, latest_checkpoint,
    load_checkpoint, make_accelerator, process_slice, progress, save_checkpoint, steps_per_epoch,
)

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Per-step sums reduced over micro-batches and processes; divided by their counts for logging.
_STATS = ("loss", "sft_nll", "beta", "chosen_reward", "n_records", "rejected_reward", "margin", "accuracy",
          "n_pairs", "n_tokens")


@dataclass
class ModelConfig:
    """The policy: a local ``save_pretrained`` directory. The vision tower is frozen by default."""

    path: str = ""
    dtype: str | None = None
    trust_remote_code: bool = False
    freeze_vision: bool = True
    train_projector: bool = True


@dataclass
class LoraConfig:
    """LoRA on the language model's linear layers named in ``target_modules`` (Apple used rank 128, alpha 256).

    ``enabled: false`` is full fine-tuning. Dropout is off everywhere so policy and reference agree at step 0.
    """

    enabled: bool = True
    rank: int = 128
    alpha: int = 256
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0 or not self.target_modules:
            raise ValueError("lora needs rank >= 1, alpha > 0 and at least one target module")


@dataclass
class DataConfig:
    """Preference records (``.jsonl``/``.parquet``) with >= 1 rejected answer each.

    ``skip_invalid_to``: a JSONL file that receives bad records (format errors, too long) which are then
    skipped and counted; without it the first bad record is an error.
    """

    train: str = ""
    data_root: str | None = None
    max_length: int = 2048
    skip_invalid_to: str | None = None


@dataclass
class LossConfig:
    """Which loss (``PREFERENCE_LOSSES``), its beta, the SFT term, MM-DPO beta, weights of the rejected slots.

    ``rejected_weights``: one weight per rejected slot (Apple Eq. 5; empty = equal weights).
    ``dynamic_beta``: beta per pair from ``meta[margin_key]`` (MM-DPO; ``beta_w``, ``beta_k``).
    """

    name: Literal["dpo", "ipo", "slic"] = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    rejected_weights: list[float] = field(default_factory=list)
    dynamic_beta: bool = False
    beta_w: float = 0.5
    beta_k: float = 0.5
    margin_key: str = "reward_margin"

    def __post_init__(self) -> None:
        if self.beta <= 0 or not 0 <= self.label_smoothing < 0.5 or self.sft_weight < 0:
            raise ValueError("loss needs beta > 0, 0 <= label_smoothing < 0.5 and sft_weight >= 0")
        if self.beta_w < 0 or self.beta_k <= 0:
            raise ValueError("MM-DPO needs beta_w >= 0 and beta_k > 0")
        if any(w < 0 for w in self.rejected_weights) or (self.rejected_weights and not any(self.rejected_weights)):
            raise ValueError("rejected_weights must be >= 0 with at least one > 0")


@dataclass
class OfflineConfig:
    """``batch_size`` is the global batch in records per optimizer step (all processes and micro-batches)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    batch_size: int = 8
    epochs: int = 1
    max_steps: int = 0
    ref_cache_dir: str | None = None
    merge_weights: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("batch_size >= 1, epochs >= 1 and max_steps >= 0 are required")
        if self.merge_weights and not self.lora.enabled:
            raise ValueError("merge_weights needs lora.enabled (full fine-tuning already saves whole weights)")
        if self.lora.enabled and not self.model.freeze_vision:
            raise ValueError("under LoRA the vision tower stays frozen: set model.freeze_vision=true or lora.enabled=false")


# --- model -------------------------------------------------------------------------------------------------


def _projector_modules(names: list[str]) -> tuple[list[str], list[str]]:
    """Projector parameter names -> (module names for PEFT ``modules_to_save``, bare parameters)."""
    modules, bare = set(), []
    for name in names:
        parts = name.split(".")
        cut = next(i for i, part in enumerate(parts) if part in PROJECTOR_MODULES)
        (bare.append(name) if cut == len(parts) - 1 else modules.add(".".join(parts[: cut + 1])))
    return sorted(modules), bare


def prepare_policy(cfg: OfflineConfig) -> tuple[Any, Any, Any, list[str]]:
    """Load the policy and set what trains; returns (policy, processor, frozen reference or None, projector names).

    Under LoRA the reference is the policy with its adapter disabled (None is returned); a bare projector
    parameter (LLaVA-NeXT ``image_newline``) cannot be a PEFT module and stays frozen there.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    model, processor = load_vlm(cfg.model.path, dtype=cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code)
    for module in model.modules():  # TRL's disable_dropout: policy and reference must agree at step 0
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    if cfg.model.freeze_vision:
        freeze_vision_tower(model)
    projector = projector_param_names(model)
    if not cfg.lora.enabled:
        for name, param in model.named_parameters():
            if name in projector and not cfg.model.train_projector:
                param.requires_grad_(False)
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        return model.train(), processor, reference, projector
    decoder = {id(m) for m in model.get_decoder().modules()}
    targets = [name for name, m in model.named_modules() if id(m) in decoder and isinstance(m, torch.nn.Linear)
               and name.rsplit(".", 1)[-1] in cfg.lora.target_modules]
    if not targets:
        raise ConfigError(f"lora.target_modules {cfg.lora.target_modules} match no linear layer of the language model")
    to_save, bare = _projector_modules(projector) if cfg.model.train_projector else ([], [])
    if bare:
        logger.warning("projector parameters %s are not modules; they stay frozen under LoRA", bare)
    peft_config = PeftLoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                 target_modules=targets, modules_to_save=to_save or None)
    model = get_peft_model(model, peft_config)
    projector = [n for n, p in model.named_parameters() if p.requires_grad and ".modules_to_save." in n]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("LoRA on %d layers (+%d projector tensors): %d trainable parameters", len(targets),
                len(projector), trainable)
    return model.train(), processor, None, projector


# --- data --------------------------------------------------------------------------------------------------


def _data_root(cfg: DataConfig) -> Path:
    return Path(cfg.data_root) if cfg.data_root is not None else Path(cfg.train).parent


def _images(record: PreferenceRecord, root: Path) -> list[Any]:
    return [open_image(ref, root) for ref in record.images]


def load_pairs(cfg: OfflineConfig, processor: Any, is_main: bool) -> tuple[list[PreferenceRecord], int]:
    """Read and check the preference records; returns (usable records, number skipped).

    Refused (or, with ``data.skip_invalid_to``, skipped and listed there by the main process): format errors
    incl. zero rejected answers, rejected == chosen and non-finite ``meta`` (``read_records``); a missing or
    non-numeric MM-DPO margin; a prompt + answer longer than ``data.max_length`` (image tokens are never cut).
    """
    data = cfg.data
    with tempfile.TemporaryDirectory() as tmp:  # one listing per process; the main one publishes it
        listing = Path(tmp) / "skipped.jsonl" if data.skip_invalid_to else None
        records = read_records(data.train, data_root=data.data_root, min_rejected=1, skip_invalid_to=listing)
        skipped = listing.read_text().splitlines() if listing else []
    root, kept = _data_root(data), []
    for record in records:
        margin = record.meta.get(cfg.loss.margin_key)
        if cfg.loss.dynamic_beta and (not isinstance(margin, (int, float)) or isinstance(margin, bool)):
            error = RecordError(f"dynamic_beta needs a numeric reward margin, got {margin!r}", file=data.train,
                                record_id=record.id, field=f"meta.{cfg.loss.margin_key}")
        else:
            try:
                collate_preference(processor, [record], [_images(record, root)], data.max_length)
                kept.append(record)
                continue
            except SequenceTooLong as err:
                error = RecordError(str(err), file=data.train, record_id=record.id, field="max_length")
        if not data.skip_invalid_to:
            raise error
        skipped.append(json.dumps(error.as_dict()))
    if data.skip_invalid_to and is_main:
        Path(data.skip_invalid_to).write_text("".join(line + "\n" for line in skipped))
    if skipped:
        logger.warning("%s: skipped %d record(s), listed in %s", data.train, len(skipped), data.skip_invalid_to)
    if not kept:
        raise ConfigError(f"{data.train}: no usable preference record ({len(skipped)} skipped)")
    k = max(len(r.rejected) for r in kept)
    if cfg.loss.rejected_weights and len(cfg.loss.rejected_weights) < k:
        raise ConfigError(f"loss.rejected_weights has {len(cfg.loss.rejected_weights)} weights; records hold up to {k}")
    return kept, len(skipped)


def data_fingerprint(cfg: DataConfig, records: list[PreferenceRecord], n_skipped: int) -> tuple[dict, list]:
    """(fingerprint dict of the training data, per-record image SHA-256 lists)."""
    root = _data_root(cfg)
    image_hashes = [[image_sha256(ref, root) for ref in r.images] for r in records]
    digest = hashlib.sha256(json.dumps([[r.id for r in records], image_hashes]).encode()).hexdigest()
    file_digest = hashlib.sha256(Path(cfg.train).read_bytes()).hexdigest()
    return {"train": cfg.train, "file_sha256": file_digest, "records_sha256": digest,
            "n_records": len(records), "n_skipped": n_skipped}, image_hashes


# --- reference ---------------------------------------------------------------------------------------------


def reference_fn(cfg: OfflineConfig, accelerator: Accelerator, policy: Any, frozen: Any | None, processor: Any,
                 records: list[PreferenceRecord], image_hashes: list[list[str]], micro: int) -> RefFn:
    """The reference: a live forward pass, or (``ref_cache_dir``) log-probs computed once and looked up."""
    live = live_reference(policy, frozen)
    if not cfg.ref_cache_dir:
        return live
    fp = model_fingerprint(cfg.model.path, str(cfg.model.dtype), cfg.run.mixed_precision)
    keys = [[answer_cache_key(fp, image_hashes[i], r.prompt, a) for a in (r.chosen, *r.rejected)]
            for i, r in enumerate(records)]
    root = _data_root(cfg.data)

    def compute(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = collate_preference(processor, [records[i] for i in indices],
                                   [_images(records[i], root) for i in indices], cfg.data.max_length)
        with accelerator.autocast():
            return live(_to_device(batch, accelerator.device), indices)

    return cached_reference(keys, Path(cfg.ref_cache_dir) / f"{fp[:16]}.jsonl", compute, accelerator, micro)


# --- one step ----------------------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) for k, v in batch.items()}


def micro_loss(cfg: OfflineConfig, policy: Any, reference: RefFn, batch: dict[str, Any],
               records: list[PreferenceRecord], indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean loss over the micro-batch's R records and the sums of ``_STATS`` (float[len(_STATS)])."""
    out = preference_forward(policy, batch)
    ref_chosen, ref_rejected = reference(batch, indices)
    chunk = [records[i] for i in indices]
    beta: float | torch.Tensor = cfg.loss.beta
    if cfg.loss.dynamic_beta:
        margins = torch.tensor([float(r.meta[cfg.loss.margin_key]) for r in chunk], device=out.chosen_logps.device)
        beta = mm_dpo_beta(cfg.loss.beta, margins, w=cfg.loss.beta_w, k=cfg.loss.beta_k)
    logps = PreferenceLogps(out.chosen_logps, out.rejected_logps, ref_chosen, ref_rejected,
                            out.chosen_lengths, out.rejected_lengths)
    pair = PREFERENCE_LOSSES[cfg.loss.name](logps, beta=beta, label_smoothing=cfg.loss.label_smoothing)
    k = out.rejected_mask.shape[1]
    weights = torch.tensor(cfg.loss.rejected_weights[:k] or [1.0] * k, device=pair.losses.device)
    per_record = combine_rejected(pair.losses, out.rejected_mask, weights)
    sft = sft_nll(out.chosen_token_logps, out.chosen_mask)
    per_record = per_record + cfg.loss.sft_weight * sft
    mask = out.rejected_mask.float()
    margin = (pair.chosen_rewards.unsqueeze(-1) - pair.rejected_rewards) * mask
    beta_sum = beta.sum() if isinstance(beta, torch.Tensor) else beta * len(chunk)
    values = [per_record.detach().sum(), sft.detach().sum(), beta_sum, pair.chosen_rewards.sum(), len(chunk),
              (pair.rejected_rewards * mask).sum(), margin.sum(), ((margin > 0).float() * mask).sum(), mask.sum(),
              batch["attention_mask"].sum()]
    stats = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=mask.device) for v in values])
    return per_record.mean(), stats


@dataclass
class _Run:
    """What the loop carries from step to step."""

    cfg: OfflineConfig
    accelerator: Accelerator
    policy: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    reference: RefFn
    records: list[PreferenceRecord]
    micro: int


def train_step(run: _Run, step: int) -> dict[str, float]:
    """Optimizer step ``step`` (1-based): forward/backward over this process's micro-batches, then update."""
    cfg, acc = run.cfg, run.accelerator
    indices = process_slice(batch_indices(len(run.records), cfg.batch_size, step - 1, cfg.run.seed), acc)
    root, sums, grad_norm = _data_root(cfg.data), torch.zeros(len(_STATS), device=acc.device), torch.tensor(0.0)
    started = time.perf_counter()
    for start in range(0, len(indices), run.micro):
        chunk = indices[start: start + run.micro]
        batch = _to_device(collate_preference(run.processor, [run.records[i] for i in chunk],
                                              [_images(run.records[i], root) for i in chunk], cfg.data.max_length),
                           acc.device)
        with acc.accumulate(run.policy):
            with acc.autocast():
                loss, stats = micro_loss(cfg, run.policy, run.reference, batch, run.records, chunk)
            acc.backward(loss)
            if acc.sync_gradients and cfg.optim.max_grad_norm > 0:
                # DeepSpeed clips inside its engine step and reports no norm before it has one.
                norm = acc.clip_grad_norm_(run.policy.parameters(), cfg.optim.max_grad_norm)
                grad_norm = grad_norm if norm is None else norm
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        sums += stats
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()  # once per optimizer step, whatever the process count (not through accelerate)
    s = dict(zip(_STATS, acc.reduce(sums, "sum").tolist()))
    elapsed = time.perf_counter() - started
    return {
        "loss": s["loss"] / s["n_records"], "sft_nll": s["sft_nll"] / s["n_records"],
        "rewards/chosen": s["chosen_reward"] / s["n_records"], "rewards/rejected": s["rejected_reward"] / s["n_pairs"],
        "rewards/margin": s["margin"] / s["n_pairs"], "rewards/accuracy": s["accuracy"] / s["n_pairs"],
        "beta": s["beta"] / s["n_records"], "lr": lr, "grad_norm": float(grad_norm),
        "tokens_per_s": s["n_tokens"] / elapsed,
    }


# --- outputs and the loop ----------------------------------------------------------------------------------


def save_outputs(run: _Run, out: Path, fingerprint: dict) -> None:
    """Adapter (LoRA) or model (full FT) + processor, merged weights on request, config, data fingerprint."""
    acc, cfg = run.accelerator, run.cfg
    unwrapped = acc.unwrap_model(run.policy)
    target = out / ("adapter" if cfg.lora.enabled else "model")
    unwrapped.save_pretrained(target, is_main_process=acc.is_main_process, save_function=acc.save,
                              state_dict=acc.get_state_dict(run.policy))
    if acc.is_main_process:
        run.processor.save_pretrained(target)
        if cfg.merge_weights:
            merged = unwrapped.merge_and_unload()
            merged.save_pretrained(out / "merged")
            run.processor.save_pretrained(out / "merged")
        save_config(cfg, out)
        (out / "data_fingerprint.json").write_text(json.dumps(fingerprint, indent=2) + "\n")
    acc.wait_for_everyone()


def adapter_only_checkpoints(accelerator: Accelerator, policy: Any) -> None:
    """Under LoRA, checkpoints hold only the trainable tensors (adapter, projector copy), not the frozen base.

    accelerate hands these hooks the plain state dicts it saves and the models it loads itself (one process
    or DDP; DeepSpeed and FSDP save through their own engines and pass none), so those are the ones filtered.
    """
    from safetensors.torch import load_file

    trainable = {n for n, p in accelerator.unwrap_model(policy).named_parameters() if p.requires_grad}

    def save_hook(models: list, weights: list[dict], output_dir: str) -> None:
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k.removeprefix("module.") in trainable}

    def load_hook(models: list, input_dir: str) -> None:
        for i, model in enumerate(models):
            state = load_file(str(Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"))
            result = model.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if k.removeprefix("module.") in trainable]
            if result.unexpected_keys or missing:
                raise ValueError(f"{input_dir}: checkpoint does not fit the model (unexpected "
                                 f"{result.unexpected_keys[:5]}, missing trainable {missing[:5]})")
        models.clear()  # loaded here; accelerate would insist on the frozen weights too

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _micro_batch(cfg: OfflineConfig, accelerator: Accelerator) -> int:
    parts = accelerator.num_processes * cfg.optim.grad_accum
    if cfg.batch_size % parts:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {accelerator.num_processes} process(es)"
                          f" x grad_accum {cfg.optim.grad_accum}")
    return cfg.batch_size // parts


def _resume(cfg: OfflineConfig, accelerator: Accelerator, fingerprint: dict) -> int:
    """Restore the newest checkpoint when ``run.resume``; returns the step it ended (0: start afresh)."""
    found = latest_checkpoint(cfg.run.output_dir) if cfg.run.resume else None
    if found is None:
        if cfg.run.resume:
            logger.info("resume: no checkpoint under %s, starting from step 0", cfg.run.output_dir)
        return 0
    state = load_checkpoint(accelerator, found)
    if {k: v for k, v in state["data_fingerprint"].items() if k != "train"} != {
            k: v for k, v in fingerprint.items() if k != "train"}:
        raise ConfigError(f"resume: {found} was trained on other data ({state['data_fingerprint']} vs {fingerprint})")
    logger.info("resumed from %s (step %d)", found, state["step"])
    return int(state["step"])


def train_offline(cfg: OfflineConfig) -> Path:
    """Run offline preference optimisation; returns the output directory.

    ``run.output_dir`` receives ``adapter/`` (LoRA; PEFT format) or ``model/`` (full fine-tuning), each with
    the processor, ``merged/`` on request, ``config.yaml``, ``data_fingerprint.json``, ``metrics.jsonl``,
    ``tensorboard/`` and ``checkpoints/step_*`` (every ``run.save_every`` steps; ``run.resume`` continues).
    """
    if not cfg.model.path or not cfg.data.train:
        raise ConfigError("model.path and data.train are required")
    out = Path(cfg.run.output_dir)
    accelerator = make_accelerator(cfg.run, cfg.optim.grad_accum)
    micro = _micro_batch(cfg, accelerator)
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader for DeepSpeed to read the size from
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro
    policy, processor, frozen, projector = prepare_policy(cfg)
    records, n_skipped = load_pairs(cfg, processor, accelerator.is_main_process)
    fingerprint, image_hashes = data_fingerprint(cfg.data, records, n_skipped)
    total = cfg.max_steps or cfg.epochs * steps_per_epoch(len(records), cfg.batch_size)
    if frozen is not None:
        frozen.to(accelerator.device)
    optimizer = build_optimizer(policy, cfg.optim, projector)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if cfg.lora.enabled:
        adapter_only_checkpoints(accelerator, policy)
    reference = reference_fn(cfg, accelerator, accelerator.unwrap_model(policy), frozen, processor, records,
                             image_hashes, micro)
    run = _Run(cfg, accelerator, policy, processor, optimizer, scheduler, reference, records, micro)
    start = _resume(cfg, accelerator, fingerprint)
    metrics = MetricsLogger(out, accelerator.is_main_process, cfg.run.tensorboard, resume_step=start)
    bar = progress(total, start, accelerator.is_main_process, f"{cfg.loss.name} ({len(records)} pairs)")
    for step in range(start + 1, total + 1):
        values = train_step(run, step)
        if step % cfg.run.log_every == 0 or step == total:
            metrics.log(step, values)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['rewards/accuracy']:.2f}")
        if cfg.run.save_every and step % cfg.run.save_every == 0 and step < total:
            save_checkpoint(accelerator, out, step, {"data_fingerprint": fingerprint}, cfg.run.keep_checkpoints)
    bar.close()
    metrics.close()
    save_outputs(run, out, fingerprint)
    logger.info("%s: %d steps on %d pairs (%d skipped) -> %s", cfg.loss.name, total, len(records), n_skipped, out)
    return out

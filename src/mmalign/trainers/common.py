"""Plumbing shared by every recipe: accelerator, optimizer, schedule, data order, logging, checkpoints.

Free functions, no base class: each ``train_*`` loop reads top to bottom and calls these.

Data order and exact resume: the order of examples is a pure function of (seed, epoch), and optimizer step
``s`` always consumes the same global batch (``batch_indices``). A checkpoint therefore only needs the step
number besides model/optimizer/scheduler/RNG state, and a resumed run continues with exactly the batches an
uninterrupted run would have seen. Each process takes its own slice of the global batch
(``process_slice``); gradient accumulation runs through ``accelerator.accumulate`` so the same loop works
under DDP, DeepSpeed and FSDP.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed

from mmalign.config import ConfigError
from mmalign.models.layouts import resolve_layout
from mmalign.models.lora import LoraConfig, ModelConfig
from mmalign.runs import TrainingStopped, check_backend
from mmalign.tracking import Trackers, check_report_to

logger = logging.getLogger(__name__)

CPUINFO = Path("/proc/cpuinfo")


@dataclass
class OptimConfig:
    """AdamW + schedule.

    ``max_grad_norm``: exactly 0 turns clipping off. A negative, NaN or infinite value is an error, never a
    silent "off" (``x > 0`` is false for both -1 and NaN).
    """

    lr: float = 1e-4  # peak learning rate (AdamW), reached after warmup
    projector_lr: float | None = None  # own rate for the vision-language projector (None: lr)
    weight_decay: float = 0.0  # AdamW weight decay
    schedule: Literal["cosine", "constant", "linear"] = "cosine"  # decay after warmup (constant keeps the warmup)
    warmup_ratio: float = 0.03  # share of the optimizer steps spent warming up linearly from 0
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step on each process (does not change the batch)

    def __post_init__(self) -> None:
        # Written as "not (valid)" so that NaN, for which every comparison is false, is refused too.
        for name in ("lr", "projector_lr"):
            value = getattr(self, name)
            if value is not None and not (0 < value < math.inf):
                raise ValueError(f"optim.{name} must be a finite number > 0, got {value}")
        if not 0 <= self.weight_decay < math.inf:
            raise ValueError(f"optim.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0 <= self.max_grad_norm < math.inf:
            raise ValueError(f"optim.max_grad_norm must be a finite number > 0, or 0 for no clipping; got "
                             f"{self.max_grad_norm}")
        if self.grad_accum < 1:
            raise ValueError("grad_accum must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes in bf16 natively (x86 AVX512-BF16 or AMX-BF16, read from /proc/cpuinfo);
    elsewhere bf16 autocast is emulated and slower than float32 (measured 2.5x slower on the lab recipe)."""
    if not CPUINFO.is_file():
        return False
    flags = set(CPUINFO.read_text().split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def native_precision() -> str:
    """The mixed precision ``auto`` resolves to: bf16 on a CUDA device that supports it or on a CPU with
    native bf16, else "no" (float32)."""
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_native_bf16() else "no"


@dataclass
class RunConfig:
    """Where a run writes, its seed, precision, how often it logs and checkpoints, and its trackers.

    ``mixed_precision: auto`` is resolved when the config is built (``native_precision``), so the saved
    config names the precision the run used; the default stays float32 ("no"), exact on every machine."""

    output_dir: str = "runs/default"  # everything the run writes goes here
    seed: int = 0  # seeds data order, initialisation and sampling
    # autocast precision of the forward passes; auto: bf16 where the hardware computes it natively, else no
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "no"
    log_every: int = 10  # optimizer steps between lines of metrics.jsonl / tracker points (and the last step)
    save_every: int = 0  # optimizer steps between checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept
    resume: bool = False  # continue from the newest checkpoint in output_dir
    # trackers (tensorboard, wandb, mlflow; none): see mmalign.tracking
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        if self.log_every < 1 or self.save_every < 0 or self.keep_checkpoints < 1:
            raise ValueError("log_every >= 1, save_every >= 0 and keep_checkpoints >= 1 are required")
        if not 0 <= self.seed < 2**32:  # numpy's seed range, which accelerate's set_seed passes it to
            raise ValueError(f"run.seed must be in [0, 2**32), got {self.seed}")
        self.report_to = check_report_to(self.report_to)
        if self.mixed_precision == "auto":
            self.mixed_precision = native_precision()


# Names TRL / transformers' TrainingArguments give the same settings (``config.ALIASES``; docs/cli.md). Absent
# on purpose: per_device_train_batch_size (batch_size is global) and lr_scheduler_type (TRL's "constant" has
# no warmup; ours keeps it).
TRAINING_ALIASES = {
    "model_name_or_path": "model.path", "learning_rate": "optim.lr", "weight_decay": "optim.weight_decay",
    "warmup_ratio": "optim.warmup_ratio", "max_grad_norm": "optim.max_grad_norm",
    "gradient_accumulation_steps": "optim.grad_accum", "output_dir": "run.output_dir", "seed": "run.seed",
    "logging_steps": "run.log_every", "save_steps": "run.save_every", "save_total_limit": "run.keep_checkpoints",
    "report_to": "run.report_to", "resume": "run.resume", "max_length": "data.max_length",
}
PREFERENCE_ALIASES = {**TRAINING_ALIASES, "num_train_epochs": "epochs", "beta": "loss.beta",
                      "loss_type": "loss.name", "label_smoothing": "loss.label_smoothing"}


@dataclass
class PreferenceRecipeConfig:
    """The sections and schedule every preference recipe (offline, online, mixed) shares, as top-level keys.

    ``batch_size`` is global: the examples of one optimizer step over all processes and micro-batches, so
    per-device batch = batch_size / (processes x optim.grad_accum), which must divide evenly (TRL's
    ``per_device_train_batch_size`` x processes x ``gradient_accumulation_steps`` = ``batch_size``).
    """

    ALIASES: ClassVar[dict[str, str]] = PREFERENCE_ALIASES

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    # global batch per optimizer step: all processes x micro-batches (per device: / (processes x grad_accum))
    batch_size: int = 8
    epochs: int = 1  # passes over the data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps to run; > 0 replaces epochs
    # batch layout of policy and reference passes (mmalign.models.layouts); auto: prefix_cache where exact
    forward: Literal["auto", "prefix_cache", "shared_prefix", "plain"] = "auto"

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.epochs < 1 or self.max_steps < 0:
            raise ValueError("batch_size >= 1, epochs >= 1 and max_steps >= 0 are required")
        if self.lora.enabled and not self.model.freeze_vision:
            raise ValueError("under LoRA the vision tower stays frozen: set model.freeze_vision=true or "
                             "lora.enabled=false")


def make_accelerator(run: RunConfig, grad_accum: int = 1) -> Accelerator:
    """An Accelerator for this run; devices and process layout come from ``accelerate launch``.

    One process may run several recipes in turn (the demo, pretraining then DPO), each with its own precision
    and accumulation; the per-run state is reset while the process layout (``PartialState``) is kept.
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=grad_accum,
        project_dir=run.output_dir,
    )
    check_backend(str(accelerator.distributed_type.value))
    set_seed(run.seed)
    return accelerator


def trainer_layout(forward: str, policy: Any, max_length: int, accelerator: Accelerator) -> str:
    """The batch layout a recipe runs (``layouts.resolve_layout``), seeing FSDP's activation checkpointing too."""
    fsdp = accelerator.distributed_type == DistributedType.FSDP  # only then does the state hold an fsdp_plugin
    return resolve_layout(forward, policy, max_length,
                          activation_checkpointing=fsdp and accelerator.state.fsdp_plugin.activation_checkpointing)


def build_optimizer(model: torch.nn.Module, optim: OptimConfig,
                    projector_params: Iterable[str] = ()) -> torch.optim.AdamW:
    """AdamW over trainable parameters; names in ``projector_params`` get ``optim.projector_lr``."""
    projector = set(projector_params)
    main, proj = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (proj if optim.projector_lr is not None and name in projector else main).append(param)
    if not main and not proj:
        raise ValueError("the model has no trainable parameters")
    groups = [{"params": main, "lr": optim.lr}]
    if proj:
        groups.append({"params": proj, "lr": optim.projector_lr})
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, total_steps: int):
    """Warmup then cosine / linear decay or constant, over ``total_steps`` optimizer steps."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[optim.schedule]
    warmup = math.ceil(optim.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def steps_per_epoch(n_examples: int, global_batch: int) -> int:
    if n_examples < global_batch:
        raise ConfigError(f"batch_size {global_batch} is larger than the data ({n_examples} usable examples); "
                          "lower batch_size")
    return n_examples // global_batch


def batch_indices(n_examples: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Example indices of the global batch consumed at optimizer step ``step`` (0-based).

    Epoch ``e`` uses the permutation seeded by ``seed + e``; the tail that does not fill a batch is dropped.
    """
    per_epoch = steps_per_epoch(n_examples, global_batch)
    epoch, k = divmod(step, per_epoch)
    order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
    return order[k * global_batch:(k + 1) * global_batch].tolist()


def process_slice(indices: list[int], accelerator: Accelerator) -> list[int]:
    """This process's contiguous share of a global batch (equal shares; global batch % processes == 0)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(indices) % world:
        raise ConfigError(f"batch_size {len(indices)} is not divisible by {world} processes")
    share = len(indices) // world
    return indices[rank * share:(rank + 1) * share]


def _logged_lines(path: Path) -> list[str]:
    """The complete lines of a metrics log; a last line torn by a kill mid-write is dropped with a warning, a
    damaged line elsewhere is an error naming it."""
    lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for number, line in enumerate(lines, start=1):
        try:
            json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: damaged metrics line ({err}); fix or remove it") from err
            logger.warning("%s: dropping a torn last line (%r)", path, line[:80])
            return lines[:-1]
    return lines


def stop_if_not_finite(accelerator: Accelerator, step: int, values: dict[str, torch.Tensor | float]) -> None:
    """Raise ``TrainingStopped`` on every process when any of ``values`` (this process's step loss, grad norm)
    is NaN or infinite on any process; called before ``optimizer.step()``, so the weights, the checkpoints and
    the log stay as they were after the last good step."""
    local = torch.stack([torch.as_tensor(v, dtype=torch.float32).to(accelerator.device).reshape(()) for v in
                         values.values()])
    bad = accelerator.reduce((~torch.isfinite(local)).float(), "sum")
    if bad.any():
        names = [name for name, n in zip(values, bad.tolist()) if n]
        raise TrainingStopped(
            f"step {step}: {' and '.join(names)} became non-finite (local values "
            f"{', '.join(f'{k}={float(v):g}' for k, v in zip(values, local.tolist()))}); stopped before the update, "
            "so the weights and checkpoints are those of the last good step. Lower optim.lr or loss.beta, or set "
            "optim.max_grad_norm")


class MetricsLogger:
    """Per-step metrics to ``metrics.jsonl`` and the ``report_to`` trackers (``mmalign.tracking``), on the main
    process; ``config`` (the resolved config as a dict) is logged as the trackers' hyperparameters.

    On resume from step ``resume_step``, lines of later steps left by the killed run are dropped first, so
    the log holds every step exactly once.
    """

    def __init__(self, out_dir: str | Path, enabled: bool, report_to: list[str], resume_step: int = 0,
                 config: dict[str, Any] | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.trackers = Trackers(report_to, out_dir, config, resume_step, enabled)
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = [line for line in _logged_lines(self.path) if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.trackers.log(metrics, step)

    def close(self) -> None:
        self.trackers.close()


def whole_weights_dir(out: Path, lora: bool, merge: bool) -> Path | None:
    """The folder ``save_weights`` fills with loadable whole weights: ``model/`` (full fine-tuning), ``merged/``
    (LoRA with ``merge``), or None (LoRA adapter only)."""
    if not lora:
        return out / "model"
    return out / "merged" if merge else None


def save_weights(accelerator: Accelerator, policy: torch.nn.Module, processor: Any, out: Path, lora: bool,
                 merge: bool) -> None:
    """A finished run's weights with the processor: ``adapter/`` (LoRA, PEFT format) or ``model/`` (full
    fine-tuning), plus ``merged/`` under LoRA with ``merge``; every process takes part (sharded state dicts)."""
    unwrapped = accelerator.unwrap_model(policy)
    target = out / ("adapter" if lora else "model")
    unwrapped.save_pretrained(target, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                              state_dict=accelerator.get_state_dict(policy))
    if accelerator.is_main_process:
        processor.save_pretrained(target)
        if lora and merge:
            merged = whole_weights_dir(out, lora, merge)
            unwrapped.merge_and_unload().save_pretrained(merged)
            processor.save_pretrained(merged)

"""Plumbing shared by every recipe: accelerator, optimizer, schedule, data order, logging; checkpoints and saved
weights live in ``trainers.checkpoints`` (re-exported here).

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
from typing import Any, Callable, ClassVar, Iterable, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed

from mmalign.config import ConfigError, to_dict
from mmalign.models.layouts import resolve_layout
from mmalign.models.lora import LoraConfig, ModelConfig
from mmalign.progress import progress
from mmalign.runs import TrainingStopped, check_backend
from mmalign.tracking import Trackers, check_report_to
from mmalign.trainers.checkpoints import (  # noqa: F401  (re-exported: the recipes import them from here)
    STATE_FILE, adapter_only_checkpoints, latest_checkpoint, resume_from, save_checkpoint, save_weights,
    step_checkpoint, whole_weights_dir,
)

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


def micro_batch_size(cfg: PreferenceRecipeConfig, accelerator: Accelerator) -> int:
    """Records per micro-batch: the global ``batch_size`` split over processes and ``optim.grad_accum``."""
    parts = accelerator.num_processes * cfg.optim.grad_accum
    if cfg.batch_size % parts:
        raise ConfigError(f"batch_size {cfg.batch_size} is not divisible by {accelerator.num_processes} process(es)"
                          f" x grad_accum {cfg.optim.grad_accum}")
    return cfg.batch_size // parts


def resume_step(run: RunConfig, accelerator: Accelerator, scheduler: Any, fingerprint: dict) -> int:
    """Restore the newest intact checkpoint when ``run.resume`` (``checkpoints.resume_from``: model, optimizer,
    RNG states, ``scheduler``); returns the step it ended (0: start afresh).

    A checkpoint saved with ``{"data_fingerprint": ...}`` for other data (the file's path aside) is refused.
    """
    state = resume_from(accelerator, run.output_dir, scheduler) if run.resume else None
    if state is None:
        if run.resume:
            logger.info("resume: no usable checkpoint under %s, starting from step 0", run.output_dir)
        return 0
    if {k: v for k, v in state["data_fingerprint"].items() if k != "train"} != {
            k: v for k, v in fingerprint.items() if k != "train"}:
        raise ConfigError(f"resume: step {state['step']} was trained on other data ({state['data_fingerprint']} vs "
                          f"{fingerprint})")
    return int(state["step"])


MicroLoss = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]  # record indices -> (mean loss, stat sums)


def accumulated_update(accelerator: Accelerator, model: Any, optimizer: Any, scheduler: Any, max_grad_norm: float,
                       indices: list[int], micro: int, micro_loss: MicroLoss, n_stats: int, step: int
                       ) -> tuple[dict[str, Any], float]:
    """One optimizer step (recipe step ``step``) over this process's ``indices`` in micro-batches of ``micro``
    records: ``micro_loss(chunk)`` -> (mean loss, float[n_stats] sums), each backward through
    ``accelerator.accumulate``, gradient clipping at ``max_grad_norm`` (0: none), a stop before the update when
    the loss or gradient norm is not finite (``stop_if_not_finite``), then one scheduler step. Returns ({"sums":
    the sums reduced over micro-batches and processes, "grad_norm": float}, the learning rate the step used)."""
    sums, grad_norm = torch.zeros(n_stats, device=accelerator.device), torch.tensor(0.0)
    losses = torch.zeros((), device=accelerator.device)
    for start in range(0, len(indices), micro):
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, stats = micro_loss(indices[start: start + micro])
            accelerator.backward(loss)
            losses += loss.detach().float()
            if accelerator.sync_gradients and max_grad_norm > 0:
                # DeepSpeed clips inside its engine step and reports no norm before it has one.
                norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                grad_norm = grad_norm if norm is None else norm
            if accelerator.sync_gradients:
                stop_if_not_finite(accelerator, step, {"loss": losses, "grad_norm": grad_norm})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sums += stats
    lr = scheduler.get_last_lr()[0]
    scheduler.step()  # once per optimizer step, whatever the process count (not through accelerate)
    return {"sums": accelerator.reduce(sums, "sum").tolist(), "grad_norm": float(grad_norm)}, lr


def run_steps(accelerator: Accelerator, cfg: PreferenceRecipeConfig, total: int, start: int, fingerprint: dict,
              train_step: Callable[[int], dict[str, float]], desc: str, accuracy_key: str, *, scheduler: Any,
              save_adapter: Callable[[Path], None] | None = None) -> None:
    """Optimizer steps ``start + 1 .. total`` of a recipe: ``train_step(step)`` returns the step's metrics (with
    ``loss`` and ``accuracy_key``), logged every ``run.log_every`` steps and at the last (``metrics.jsonl`` and the
    trackers, the resolved ``cfg`` as their hyperparameters); with ``run.save_every``, a checkpoint every that many
    steps and at the last (``trainers.checkpoints``: ``scheduler`` as JSON, ``save_adapter(folder)`` writing a
    loadable adapter into it); a progress bar."""
    run = cfg.run
    out = Path(run.output_dir)
    metrics = MetricsLogger(out, accelerator.is_main_process, run.report_to, resume_step=start, config=to_dict(cfg))
    bar = progress(total, desc, initial=start, enabled=accelerator.is_main_process, unit="step")
    for step in range(start + 1, total + 1):
        values = train_step(step)
        if step % run.log_every == 0 or step == total:
            metrics.log(step, values)
        bar.update(1)
        bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values[accuracy_key]:.2f}")
        step_checkpoint(accelerator, run, step, total, {"data_fingerprint": fingerprint}, scheduler=scheduler,
                        save_adapter=save_adapter)
    bar.close()
    metrics.close()

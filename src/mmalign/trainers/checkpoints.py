"""Checkpoints and saved weights of every recipe: atomic ``save_checkpoint`` / ``latest_checkpoint`` /
``load_checkpoint`` (model, optimizer, scheduler, RNG state and ``trainer_state.json``), adapter-only
checkpoints under LoRA, and a finished run's weights (``save_weights``, ``whole_weights_dir``)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

STATE_FILE = "trainer_state.json"


def _checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


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


def save_checkpoint(accelerator: Accelerator, out_dir: str | Path, step: int, extra: dict[str, Any],
                    keep: int = 2) -> Path:
    """Save model, optimizer, registered objects (scheduler) and RNG states after optimizer step ``step``.

    The state is written to a temporary folder and renamed, and ``trainer_state.json`` is written last, so a
    kill mid-save never leaves a checkpoint that ``latest_checkpoint`` would pick.
    """
    root = _checkpoint_dir(out_dir)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **extra}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(p for p in root.glob("step_*") if p.suffix != ".tmp")[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint under ``out_dir`` or None."""
    root = _checkpoint_dir(out_dir)
    done = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).exists() and p.suffix != ".tmp")
    return done[-1] if done else None


def load_checkpoint(accelerator: Accelerator, path: str | Path) -> dict[str, Any]:
    """Restore everything ``save_checkpoint`` saved; returns its ``trainer_state.json`` (with ``step``)."""
    accelerator.load_state(str(path))
    return json.loads((Path(path) / STATE_FILE).read_text())


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

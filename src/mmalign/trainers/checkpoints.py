"""Checkpoints every recipe saves and resumes from: verified, skipped when damaged, never unpickled; and a
finished run's weights (``save_weights``, ``whole_weights_dir``).

A checkpoint ``<output_dir>/checkpoints/step_<s>/`` holds

- what ``accelerator.save_state`` writes for the model (``model.safetensors``; under LoRA only the trainable
  tensors, see ``adapter_only_checkpoints``) and the optimizer (``optimizer.bin``, which accelerate reads back
  with ``torch.load(weights_only=True)``: only tensors and plain containers are rebuilt, anything else is
  refused, so a planted pickle cannot run code);
- ``rng_<i>.json``: process i's Python, NumPy, torch and CUDA generator states as JSON (accelerate's own
  ``random_states_<i>.pkl`` is deleted: it swallows any failure to read it, so a bad one would silently break
  exact resumption);
- ``adapter/``: under LoRA, the adapter in PEFT format with the processor, loadable as it is
  (``PeftModel.from_pretrained(base, ".../adapter")``, or ``mmalign eval`` with it as the adapter);
- ``trainer_state.json``, written last: the step, the number of processes, the learning-rate schedule's state as
  JSON (schedulers are not handed to accelerate, whose ``custom_checkpoint_*.pkl`` it would read back with
  ``weights_only=False``), the recipe's extras, and a manifest of every other file with its size and SHA-256.

Resuming takes the newest checkpoint whose files match their manifest and that loads; a damaged one (a torn or
altered file, a missing file, no manifest) is skipped for the next older one with a warning naming what is
wrong. The check costs one read of the checkpoint's files. Under DeepSpeed the engine writes and reads its own
files (``pickle`` included); the manifest still guards them against damage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def checkpoint_root(out_dir: str | Path) -> Path:
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``folder`` but the state file."""
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_FILE}


def save_checkpoint(accelerator: Accelerator, out_dir: str | Path, step: int, extra: dict[str, Any], keep: int = 2,
                    *, scheduler: Any, save_adapter: Callable[[Path], None] | None = None) -> Path:
    """Save model, optimizer, RNG states, ``scheduler`` and a loadable adapter (``save_adapter(folder)`` writes
    ``folder/adapter/``, e.g. ``save_weights`` under LoRA) after optimizer step ``step``; keep the newest ``keep``.

    The state goes to a temporary folder renamed at the end, and ``trainer_state.json`` (with the manifest) is
    written last, so a kill mid-save never leaves a checkpoint that resuming would take.
    """
    root = checkpoint_root(out_dir)
    final, tmp = root / f"step_{step:08d}", root / f"step_{step:08d}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    (tmp / f"random_states_{accelerator.process_index}.pkl").unlink()
    (tmp / f"rng_{accelerator.process_index}.json").write_text(json.dumps(_rng_state()))
    if save_adapter is not None:
        save_adapter(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "num_processes": accelerator.num_processes, "scheduler": scheduler.state_dict(),
                 **extra, "files": _manifest(tmp)}
        (tmp / STATE_FILE).write_text(json.dumps(state, allow_nan=False))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(out_dir)[keep:]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def step_checkpoint(accelerator: Accelerator, run: Any, step: int, total: int, extra: dict[str, Any], *,
                    scheduler: Any, save_adapter: Callable[[Path], None] | None = None) -> None:
    """``save_checkpoint`` into ``run.output_dir`` when ``run.save_every`` asks for step ``step`` of ``total``: every
    that many steps, and the last one too, so a finished run can be continued to more steps."""
    if run.save_every and (step % run.save_every == 0 or step == total):
        save_checkpoint(accelerator, run.output_dir, step, extra, run.keep_checkpoints, scheduler=scheduler,
                        save_adapter=save_adapter)


def lora_adapter_saver(accelerator: Accelerator, policy: torch.nn.Module, processor: Any,
                       lora: bool) -> Callable[[Path], None] | None:
    """The ``save_adapter`` of a LoRA policy (its PEFT ``adapter/`` into a checkpoint folder); None without LoRA."""
    if not lora:
        return None
    return lambda folder: save_weights(accelerator, policy, processor, folder, lora=True, merge=False)


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders (a ``trainer_state.json``, not ``.tmp``), newest first; not yet verified."""
    found = [p for p in checkpoint_root(out_dir).glob("step_*") if p.suffix != ".tmp" and (p / STATE_FILE).exists()]
    return sorted(found, reverse=True)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (unreadable state, no manifest, a file missing, of
    another size or content), or None when every file matches its manifest."""
    path = Path(path)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{STATE_FILE} is unreadable ({err})"
    if not isinstance(state, dict) or not isinstance(state.get("files"), dict) or "scheduler" not in state:
        return f"{STATE_FILE} has no file manifest or scheduler state (written by an older mmalign?)"
    for name, expected in state["files"].items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {expected['bytes']} were written"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not have the content that was written (SHA-256 differs)"
    return None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest checkpoint under ``out_dir`` whose files match their manifest, or None."""
    return next((p for p in checkpoints(out_dir) if checkpoint_problem(p) is None), None)


def _everyone(accelerator: Accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every process (so that all processes take the same checkpoint)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() == 0


def resume_from(accelerator: Accelerator, out_dir: str | Path, scheduler: Any) -> dict[str, Any] | None:
    """Restore the newest intact checkpoint under ``out_dir`` into the prepared model and optimizer, the RNG
    states and ``scheduler``; returns its ``trainer_state.json`` (``step`` and the recipe's extras), or None when
    there is none. Damaged checkpoints are skipped, newest first, each with a warning."""
    for path in checkpoints(out_dir):
        problem = checkpoint_problem(path) if accelerator.is_main_process else None
        if not _everyone(accelerator, problem is None):
            logger.warning("resume: skipping damaged checkpoint %s: %s", path, problem or "see the main process")
            continue
        state = json.loads((path / STATE_FILE).read_text())
        try:
            accelerator.load_state(str(path))
            scheduler.load_state_dict(state["scheduler"])
            _load_rng(path / f"rng_{accelerator.process_index}.json")
            error = None
        except Exception as err:  # noqa: BLE001 - any failure to load means: try the older checkpoint
            error = f"{type(err).__name__}: {err}"
        if _everyone(accelerator, error is None):
            logger.info("resumed from %s (step %d)", path, state["step"])
            return state
        logger.warning("resume: skipping checkpoint %s, which does not load: %s", path,
                       error or "it failed on another process")
    return None


def _rng_state() -> dict[str, Any]:
    """This process's generator states as JSON values (what ``accelerate`` pickles)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"python": [version, list(internal), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _load_rng(path: Path) -> None:
    """Restore the states of ``_rng_state``; a process the checkpoint did not have (resumed on more processes)
    keeps its freshly seeded generators."""
    if not path.is_file():
        logger.warning("resume: %s is missing (the checkpoint was written by fewer processes); this process keeps "
                       "its seeded random generators", path.name)
        return
    state = json.loads(path.read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


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

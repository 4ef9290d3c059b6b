"""Experiment trackers through accelerate's tracker classes: TensorBoard (the default), W&B and MLflow.

A run names its trackers with ``report_to`` (TRL's name and values): any of ``tensorboard``, ``wandb``,
``mlflow``; ``none`` or an empty list logs to none (the JSON files every run writes stay the record). W&B and
MLflow are optional: naming one that is not installed is an error at start, not a silent skip. Where they
log: TensorBoard into ``<out_dir>/tensorboard``; W&B into the project ``$WANDB_PROJECT`` (default
"mmalign"), its local files under ``<out_dir>`` (``WANDB_MODE=offline`` works without a network); MLflow
to ``$MLFLOW_TRACKING_URI`` (experiment ``$MLFLOW_EXPERIMENT_NAME``, default "mmalign"). The run is named
after the output folder, and the resolved config is logged as its hyperparameters (dotted keys).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "mlflow")
# The module each tracker needs (tensorboard's writer ships with torch, the event format with tensorboard).
_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_report_to(report_to: list[str]) -> list[str]:
    """The validated tracker list (``["none"]`` -> ``[]``); ValueError naming an unknown or uninstalled one."""
    if report_to == ["none"]:
        return []
    unknown = [name for name in report_to if name not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to: unknown tracker(s) {unknown}; choose from {list(TRACKERS)} or none")
    missing = [name for name in report_to if importlib.util.find_spec(_MODULES[name]) is None]
    if missing:
        raise ValueError(f"report_to: {missing} not installed (pip install {' '.join(missing)}), or drop it")
    return list(dict.fromkeys(report_to))


def flat_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys with scalar values (lists as text), what trackers take as params."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= flat_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return out


def _tracker(name: str, out_dir: Path, resume_step: int) -> Any:
    from accelerate import PartialState
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    PartialState()  # accelerate's trackers log through its logger, which needs the (per-process) state

    run_name = out_dir.resolve().name
    if name == "tensorboard":
        # purge_step drops events a killed run logged past its checkpoint, as metrics.jsonl does.
        return TensorBoardTracker("tensorboard", out_dir, purge_step=resume_step + 1)
    if name == "wandb":
        return WandBTracker(os.environ.get("WANDB_PROJECT", "mmalign"), name=run_name, dir=str(out_dir))
    return MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", "mmalign"), run_name=run_name)


class Trackers:
    """The trackers of one run (none when not ``enabled``, e.g. on processes other than the main one)."""

    def __init__(self, report_to: list[str], out_dir: str | Path, config: dict[str, Any] | None = None,
                 resume_step: int = 0, enabled: bool = True):
        self.trackers = []
        if not enabled:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        for name in check_report_to(report_to):
            tracker = _tracker(name, Path(out_dir), resume_step)
            tracker.start()
            if config is not None and name != "tensorboard":  # TensorBoard's run has config.yaml beside it
                tracker.store_init_configuration(flat_config(config))
            self.trackers.append(tracker)

    def log(self, values: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []

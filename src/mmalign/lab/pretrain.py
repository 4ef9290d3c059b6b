"""The lab base-model recipe: build the lab, SFT a fresh tiny LLaVA on it, evaluate it; cached on disk.

``pretrain_base(cfg)`` skips every stage whose output already exists with the same resolved config (hash
in ``lab.yaml`` / ``pretrain.yaml``), so demos and tests reuse a trained base instead of retraining it.
``docs/lab.md`` lists the command and the metrics it reached.

The package ships one base made by this recipe (``configs/lab_pretrain.yaml``, seed 0, 3,000 steps) in
``assets/base``: the model and processor, the resolved recipe (``recipe.yaml``) and its evaluation
(``eval_metrics.json``), so the demo starts from it instead of spending ~10 CPU-minutes on pre-training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmalign.config import config_hash, load_config, save_config
from mmalign.evaluation.suite import EvalConfig, evaluate
from mmalign.lab.build import LabConfig, build_lab
from mmalign.lab.model import LabModelConfig
from mmalign.models.loading import load_vlm
from mmalign.trainers.common import OptimConfig, RunConfig
from mmalign.trainers.sft import SFTConfig, SFTDataConfig, SFTModelConfig, train_sft

logger = logging.getLogger(__name__)

RECIPE_FILE = "pretrain.yaml"
BASE_DIR = Path(__file__).parent / "assets" / "base"


@dataclass
class PretrainConfig:
    """The lab (``lab.out_dir``), the model size, and the SFT run (``run.output_dir`` gets the model)."""

    lab: LabConfig = field(default_factory=LabConfig)
    model: LabModelConfig = field(default_factory=LabModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, schedule="constant", warmup_ratio=0.0))
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/lab_base", mixed_precision="bf16",
                                                             log_every=50))
    batch_size: int = 32  # global SFT batch per optimizer step
    steps: int = 1500  # SFT optimizer steps
    image_dropout: float = 0.0  # share of SFT examples trained with the image hidden
    max_length: int = 96  # most tokens of prompt + answer
    eval_batch_size: int = 64  # batch size of the base model's evaluation


def _cached(path: Path, cfg: Any) -> bool:
    """True when ``path`` holds a config saved by ``save_config`` with the same hash as ``cfg``."""
    if not path.is_file():
        return False
    return path.read_text().startswith(f"# config_hash: {config_hash(cfg)}\n")


def sft_config(cfg: PretrainConfig, lab_dir: Path) -> SFTConfig:
    """The SFT run of the recipe: a fresh lab model trained on the lab's ``sft_train.jsonl``."""
    return SFTConfig(
        model=SFTModelConfig(lab=cfg.model),
        data=SFTDataConfig(train=str(lab_dir / "sft_train.jsonl"), max_length=cfg.max_length),
        optim=cfg.optim, run=cfg.run, batch_size=cfg.batch_size, steps=cfg.steps, image_dropout=cfg.image_dropout,
    )


def pretrain_base(cfg: PretrainConfig) -> Path:
    """Build the lab, train the base model and evaluate it, each only if not done already; returns the model dir.

    The evaluation (``mmalign.evaluation.suite``) lands in ``<run.output_dir>/eval``.
    """
    lab_dir = Path(cfg.lab.out_dir)
    if _cached(lab_dir / "lab.yaml", cfg.lab):
        logger.info("lab %s already built", lab_dir)
    else:
        build_lab(cfg.lab)
    out = Path(cfg.run.output_dir)
    if _cached(out / RECIPE_FILE, cfg) and (out / "model.safetensors").is_file():
        logger.info("base model %s already trained", out)
    else:
        train_sft(sft_config(cfg, lab_dir))
        save_config(cfg, out, RECIPE_FILE)
    if not (out / "eval" / "metrics.json").is_file():
        eval_cfg = EvalConfig(lab_dir=str(lab_dir), out_dir=str(out / "eval"), seed=cfg.run.seed,
                              batch_size=cfg.eval_batch_size)
        model, processor = load_vlm(out)
        evaluate(eval_cfg, model, processor)
    return out



def shipped_base_lab() -> LabConfig:
    """The lab the shipped base was trained on (``out_dir`` aside, a demo must build exactly this lab)."""
    recipe = load_config(PretrainConfig, BASE_DIR / "recipe.yaml")
    return recipe.lab


def load_lab_base() -> tuple[Any, Any]:
    """The shipped, pre-trained lab base model and its processor (float32, on the CPU)."""
    return load_vlm(BASE_DIR)

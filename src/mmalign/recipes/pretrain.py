"""The lab base-model recipe: the stages a real VLM goes through, at ShapesWorld scale; cached on disk.

1. ``language``: a fresh tiny LLaVA's language model learns the lab's captions as text alone (the LLM a real
   VLM starts from, and the language prior it brings: a partner follows its trigger in the captions).
2. ``vision``: the vision tower and projector learn to tag objects (``trainers.tagging``) on the lab's vision
   pre-training images, which carry no planted co-occurrence (a real encoder is pre-trained on other data
   than the instruction set).
3. ``align``: the projector alone learns to feed the frozen language model, on captions of those images
   (LLaVA's feature-alignment stage).
4. ``sft``: projector and language model (tower frozen, as in LLaVA-1.5) on the instruction mix of captions
   and yes/no questions, with ``image_dropout``: a share of the examples is trained with the image hidden,
   so the model keeps its text-only prior (without it, BDHS masking yields degenerate text, docs/lab.md).

``pretrain_base(cfg)`` skips every stage whose output exists with the same resolved config (the hash
header ``save_config`` writes), so demos and tests reuse a trained base; the base is ``run.output_dir``
(the last stage), earlier stages live in ``<run.output_dir>/stages/``, the evaluation in ``.../eval``.

The package ships one base made by this recipe (``configs/lab_pretrain.yaml``, seed 0) in ``assets/base``:
model, processor, the resolved recipe (``recipe.yaml``) and its evaluation (``eval_metrics.json``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmalign.config import config_hash, load_config, save_config
from mmalign.evaluation.suite import EvalConfig, evaluate
from mmalign.lab.build import LabConfig, build_lab
from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.models.loading import load_vlm
from mmalign.trainers.common import OptimConfig, RunConfig
from mmalign.trainers.sft import SFTConfig, SFTDataConfig, SFTModelConfig, train_sft
from mmalign.trainers.tagging import TaggingConfig, TaggingDataConfig, train_tagging

logger = logging.getLogger(__name__)

RECIPE_FILE = "pretrain.yaml"
BASE_DIR = Path(__file__).parent / "assets" / "base"


@dataclass
class Stage:
    """Optimizer steps (0 skips the stage), peak learning rate (warmup then cosine decay), global batch."""

    steps: int  # optimizer steps (0: skip the stage)
    lr: float  # peak learning rate
    batch_size: int = 32  # global batch per optimizer step

    def __post_init__(self) -> None:
        if self.steps < 0 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError(f"a stage needs steps >= 0, lr > 0 and batch_size >= 1, got {self}")


@dataclass
class PretrainConfig:
    """The lab (``lab.out_dir``), the model size, the four stages and the run (``run.output_dir`` gets the
    base). ``image_dropout`` applies to the ``sft`` stage."""

    lab: LabConfig = field(default_factory=LabConfig)  # the lab to build (cached) and train on
    model: LabModelConfig = field(default_factory=LabModelConfig)  # sizes of the fresh tiny LLaVA
    # stage 1: the language model on the captions as text
    language: Stage = field(default_factory=lambda: Stage(500, 1e-3, 64))
    # stage 2: vision tower + projector tag objects on the vision pre-training images
    vision: Stage = field(default_factory=lambda: Stage(800, 2e-3))
    align: Stage = field(default_factory=lambda: Stage(150, 1e-3))  # stage 3: the projector alone, on captions
    sft: Stage = field(default_factory=lambda: Stage(1500, 1e-3))  # stage 4: projector + language model
    image_dropout: float = 0.15  # sft: share of examples trained with the image hidden
    warmup_ratio: float = 0.03  # every stage: warmup share before the cosine decay
    run: RunConfig = field(default_factory=lambda: RunConfig(output_dir="runs/lab_base", mixed_precision="auto",
                                                             log_every=50))
    eval_batch_size: int = 64  # batch size of the base's evaluation

    def __post_init__(self) -> None:
        if self.sft.steps < 1:
            raise ValueError("sft.steps must be >= 1: the sft stage makes the base")


def _cached(path: Path, cfg: Any) -> bool:
    """True when ``path`` holds a config saved by ``save_config`` with the same hash as ``cfg``."""
    if not path.is_file():
        return False
    return path.read_text().startswith(f"# config_hash: {config_hash(cfg)}\n")


def _max_length(model: LabModelConfig) -> int:
    """Image tokens plus room for the longest lab prompt and answer."""
    return (model.image_size // model.patch_size) ** 2 + 64


def _run(cfg: PretrainConfig, out: Path) -> RunConfig:
    return dataclasses.replace(cfg.run, output_dir=str(out), resume=False, report_to=["none"])


def _optim(cfg: PretrainConfig, stage: Stage) -> OptimConfig:
    return OptimConfig(lr=stage.lr, schedule="cosine", warmup_ratio=cfg.warmup_ratio)


def _sft_stage(cfg: PretrainConfig, stage: Stage, model: Path, out: Path, train: Path, max_length: int,
               parts: list[str], image_dropout: float = 0.0) -> SFTConfig:
    return SFTConfig(model=SFTModelConfig(path=str(model)), data=SFTDataConfig(train=str(train), max_length=max_length),
                     optim=_optim(cfg, stage), run=_run(cfg, out), batch_size=stage.batch_size, steps=stage.steps,
                     image_dropout=image_dropout, trainable=parts)


def stage_configs(cfg: PretrainConfig, lab_dir: Path, out: Path) -> list[tuple[str, Any, Callable[[Any], Path]]]:
    """(name, config, train function) of each stage that runs, in order; each trains the previous one's model
    (the first: ``stages/init``, a fresh lab model); the last writes into ``out``."""
    stages_dir = out / "stages"
    images = _max_length(cfg.model)
    builders = {
        "language": lambda model, where: (_sft_stage(cfg, cfg.language, model, where, lab_dir / "text_train.jsonl",
                                                     64, ["language"]), train_sft),
        "vision": lambda model, where: (TaggingConfig(
            model=str(model), data=TaggingDataConfig(train=str(lab_dir / "vision_train.jsonl"),
                                                     eval=str(lab_dir / "pref_prompts.jsonl")),
            optim=_optim(cfg, cfg.vision), run=_run(cfg, where), batch_size=cfg.vision.batch_size,
            steps=cfg.vision.steps), train_tagging),
        "align": lambda model, where: (_sft_stage(cfg, cfg.align, model, where, lab_dir / "vision_train.jsonl",
                                                  images, ["projector"]), train_sft),
        "sft": lambda model, where: (_sft_stage(cfg, cfg.sft, model, where, lab_dir / "sft_train.jsonl", images,
                                                ["projector", "language"], cfg.image_dropout), train_sft),
    }
    plan, previous = [], stages_dir / "init"
    for name, build in builders.items():
        if getattr(cfg, name).steps == 0:
            continue
        where = out if name == "sft" else stages_dir / name
        plan.append((name, *build(previous, where)))
        previous = where
    return plan


def _fresh_model(cfg: PretrainConfig, path: Path) -> None:
    if _cached(path / RECIPE_FILE, cfg.model) and (path / "model.safetensors").is_file():
        return
    model, processor = build_lab_model(cfg.model, seed=cfg.run.seed)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    save_config(cfg.model, path, RECIPE_FILE)


def pretrain_base(cfg: PretrainConfig) -> Path:
    """Build the lab, run each stage and evaluate the base, each only if not done already; returns the base dir.

    The evaluation (``mmalign.evaluation.suite``) lands in ``<run.output_dir>/eval``.
    """
    lab_dir = Path(cfg.lab.out_dir)
    if _cached(lab_dir / "lab.yaml", cfg.lab):
        logger.info("lab %s already built", lab_dir)
    else:
        build_lab(cfg.lab)
    out = Path(cfg.run.output_dir)
    _fresh_model(cfg, out / "stages" / "init")
    for name, stage_cfg, train in stage_configs(cfg, lab_dir, out):
        done = Path(stage_cfg.run.output_dir)
        if _cached(done / "config.yaml", stage_cfg) and (done / "model.safetensors").is_file():
            logger.info("stage %s already done in %s", name, done)
            continue
        logger.info("stage %s -> %s", name, done)
        train(stage_cfg)
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

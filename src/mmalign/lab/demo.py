"""The ShapesWorld demo: base model -> preference pairs -> DPO -> evaluation, side by side with CIs.

``run_demo(cfg)`` builds the lab, takes the lab base model (the shipped one, or a recipe run), and for
every seed and method makes preference pairs from the lab's preference prompts, trains DPO on them and
evaluates the result on the held-out POPE and captioning sets; then it compares every model with the base
(paired bootstrap on the same samples) and writes a report folder. The methods are the rows of Table 6 of
the Apple paper (Amirloo et al., 2024):

- ``external``: rejected = the lab's exact corruption of the reference (the analogue of POVID's GPT-4V data);
- ``bdhs``: rejected = a BDHS answer of the base policy itself (Alg. 1, BDHS_attn), no labels at all;
- ``external_bdhs``: both rejected answers, averaged DPO losses (Eq. 5, gamma = 0.5);
- ``external_povid``: the external rejected answer plus POVID's teacher-forced answer under a noised image
  (N = 500), made inside the trainer (``trainers.povid_slot``), averaged with equal weights (Eq. 5);
- ``bdhs_noise``: BDHS with the image diffused (Eq. 9, N = 500) instead of attention masking.

Every stage writes its output before the next starts and is skipped when that output exists, so a killed
demo resumes where it stopped. Numbers shown are read back from the evaluation folders' per-sample records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmalign.config import ConfigError, save_config
from mmalign.data.record_files import read_records, write_records
from mmalign.evaluation.report import write_report
from mmalign.evaluation.suite import Comparison, EvalConfig, compare, evaluate
from mmalign.lab.build import LabConfig, build_lab
from mmalign.lab.corrupt import corrupt_lab_records
from mmalign.lab.pretrain import BASE_DIR, PretrainConfig, pretrain_base, shipped_base_lab
from mmalign.models.loading import load_vlm
from mmalign.progress import progress
from mmalign.sampling.bdhs import BDHSConfig
from mmalign.sampling.bdhs_run import BDHSRunConfig, run_bdhs
from mmalign.trainers.common import whole_weights_dir
from mmalign.trainers.offline import OfflineConfig, train_offline

logger = logging.getLogger(__name__)

METHODS = ("external", "bdhs", "external_bdhs", "external_povid", "bdhs_noise")
# The metrics the demo prints (all metrics are in the report); "better" is the direction of less hallucination.
HEADLINE = {
    "pope/random/f1": "higher", "pope/popular/f1": "higher", "pope/adversarial/f1": "higher",
    "pope_bias/yes_rate_partner": "lower", "pope_bias/yes_rate_gap_matched": "lower",
    "chair/chair_i": "lower", "chair/chair_s": "lower",
    "chair/recall": "higher", "cooccur/partner_rate": "lower",
}


def _default_dpo() -> OfflineConfig:
    cfg = OfflineConfig()
    cfg.lora.rank, cfg.lora.alpha = 16, 32
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio = 5e-4, "cosine", 0.1
    cfg.batch_size, cfg.epochs = 16, 2
    cfg.data.max_length = 256
    cfg.run.log_every = 10
    return cfg


@dataclass
class DemoConfig:
    """``base``: "shipped" (the pre-trained base in the package; ``lab`` must then be the lab it was trained on),
    "recipe" (train it, or reuse it when cached, with ``pretrain`` on this demo's lab), or a model dir trained
    on this same lab.
    ``dpo``, ``bdhs`` and ``eval`` are templates; the demo fills in model, data and output paths per run.
    """

    out_dir: str = "runs/demo"  # folder of the whole demo (lab, pairs, runs, evaluations, report)
    seeds: list[int] = field(default_factory=lambda: [0])  # one DPO run per seed and method
    # pair sources: external (exact lab corruption) and / or bdhs
    methods: list[str] = field(default_factory=lambda: ["external", "bdhs"])
    base: str = "shipped"  # shipped (the packaged base), recipe (train it) or a model folder trained on this lab
    lab: LabConfig = field(default_factory=LabConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dpo: OfflineConfig = field(default_factory=_default_dpo)
    bdhs: BDHSConfig = field(default_factory=BDHSConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=64))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")


def _once(done: Path, make: Callable[[], Any]) -> Path:
    """Run ``make`` unless ``done`` exists (a stage's final output); a rerun resumes after the last stage."""
    if done.exists():
        logger.info("demo: %s exists, skipping", done)
    else:
        make()
    return done


def _base_model(cfg: DemoConfig) -> Path:
    if cfg.base == "shipped":
        if not cfg.lab.same_base_data(shipped_base_lab()):
            raise ConfigError("base=shipped: the shipped base was trained on another lab than `lab` "
                              f"({BASE_DIR / 'recipe.yaml'}); keep the lab defaults or use base=recipe")
        return BASE_DIR
    if cfg.base == "recipe":
        pretrain = dataclasses.replace(cfg.pretrain, lab=cfg.lab)
        return pretrain_base(pretrain)
    return Path(cfg.base)


def _evaluate(cfg: DemoConfig, lab_dir: Path, model_dir: Path, out: Path) -> Path:
    def run() -> None:
        eval_cfg = dataclasses.replace(cfg.eval, lab_dir=str(lab_dir), out_dir=str(out), model=str(model_dir))
        model, processor = load_vlm(model_dir)
        evaluate(eval_cfg, model, processor)

    _once(out / "metrics.json", run)
    return out


def _bdhs_pairs(cfg: DemoConfig, source: Path, lab_dir: Path, base: Path, output: Path, seed: int,
                noise: bool) -> None:
    bdhs = dataclasses.replace(cfg.bdhs, seed=seed)
    if noise:  # BDHS_noise (Table 6): no attention masking, the image diffused for N = 500 steps
        bdhs = dataclasses.replace(bdhs, rho=0.0, noise_steps=500)
    run_bdhs(BDHSRunConfig(input=str(source), output=str(output), model=str(base),
                           data_root=str(lab_dir), bdhs=bdhs))


def make_pairs(cfg: DemoConfig, lab_dir: Path, base: Path, pairs_dir: Path, seed: int, method: str) -> Path:
    """The preference file of ``method`` for ``seed``; images stay in the lab (``data_root`` = lab dir)."""
    prompts = lab_dir / "pref_prompts.jsonl"
    external = pairs_dir / "external.jsonl"
    bias = json.loads((lab_dir / "bias.json").read_text())["pairs"]

    def corrupt() -> None:
        records = corrupt_lab_records(read_records(prompts, data_root=lab_dir), bias, seed)
        write_records(external, records, provenance={"sampler": "lab_corrupter", "seed": seed,
                                                     "input": str(prompts)})

    if method in ("external", "external_bdhs", "external_povid"):
        _once(external, corrupt)
    if method == "external_povid":  # the POVID slot is made inside the trainer
        return external
    target = pairs_dir / f"{method}.jsonl"
    if method == "bdhs":
        _once(target, lambda: _bdhs_pairs(cfg, prompts, lab_dir, base, target, seed, noise=False))
    elif method == "bdhs_noise":
        _once(target, lambda: _bdhs_pairs(cfg, prompts, lab_dir, base, target, seed, noise=True))
    elif method == "external_bdhs":  # rejected = [corrupted answer, BDHS answer] (Eq. 5)
        _once(target, lambda: _bdhs_pairs(cfg, external, lab_dir, base, target, seed, noise=False))
    return target


def _train(cfg: DemoConfig, lab_dir: Path, base: Path, pairs: Path, out: Path, seed: int, method: str) -> Path:
    dpo = dataclasses.replace(
        cfg.dpo,
        merge_weights=cfg.dpo.lora.enabled,  # evaluation loads whole weights: merged (LoRA) or model/ (full FT)
        model=dataclasses.replace(cfg.dpo.model, path=str(base)),
        # A sampler may write a pair the trainer refuses (e.g. a degenerate answer past max_length): count and
        # list it rather than stop the demo.
        data=dataclasses.replace(cfg.dpo.data, train=str(pairs), data_root=str(lab_dir),
                                 skip_invalid_to=str(out / "skipped_pairs.jsonl")),
        run=dataclasses.replace(cfg.dpo.run, output_dir=str(out), seed=seed),
        loss=dataclasses.replace(cfg.dpo.loss, rejected_weights=[0.5, 0.5] if method == "external_bdhs" else []),
        povid=dataclasses.replace(cfg.dpo.povid, enabled=method == "external_povid"),
    )
    weights = whole_weights_dir(out, dpo.lora.enabled, dpo.merge_weights)
    _once(weights / "config.json", lambda: train_offline(dpo))
    return weights


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns {"report": path, "runs": {name: eval dir}}."""
    out = Path(cfg.out_dir)
    save_config(cfg, out, "demo.yaml")
    lab = dataclasses.replace(cfg.lab, out_dir=str(out / "lab"))
    lab_dir = Path(lab.out_dir)
    # the demo's own bar: one step per stage (base, then pairs / DPO / evaluation per run), with the ETA
    stages = progress(2 + 3 * len(cfg.seeds) * len(cfg.methods), "demo stages", unit="stage")
    base = _base_model(dataclasses.replace(cfg, lab=lab))  # the recipe builds the lab itself
    _once(lab_dir / "lab.yaml", lambda: build_lab(lab))
    stages.update(1)
    runs = {"base": _evaluate(cfg, lab_dir, base, out / "eval" / "base")}
    stages.update(1)
    for seed in cfg.seeds:
        for method in cfg.methods:
            name = f"{method}_s{seed}"
            logger.info("demo: %s", name)
            pairs = make_pairs(cfg, lab_dir, base, out / f"seed_{seed}" / "pairs", seed, method)
            stages.update(1)
            model = _train(cfg, lab_dir, base, pairs, out / f"seed_{seed}" / f"dpo_{method}", seed, method)
            stages.update(1)
            runs[name] = _evaluate(cfg, lab_dir, model, out / "eval" / name)
            stages.update(1)
    stages.close()
    comparison = compare({k: str(v) for k, v in runs.items()}, n_boot=cfg.eval.stats.n_boot,
                         seed=cfg.eval.stats.seed, level=cfg.eval.stats.level)
    report = write_report(comparison, out / "report", {k: str(v) for k, v in runs.items()})
    summary = seed_table(comparison, cfg.methods, cfg.seeds)
    (out / "report" / "summary.md").write_text(
        "# Lab summary over seeds\n\nPer method: mean (min-max) over seeds, then the number of seeds whose paired "
        "bootstrap test against the base shows less hallucination (95% interval excluding 0).\n\n" + summary)
    return {"report": report, "runs": runs, "comparison": comparison, "summary": summary}


def _better(comparison: Comparison, run: str, key: str) -> bool:
    """The paired test says ``run`` hallucinates less than the base on ``key`` (95% interval excludes 0)."""
    test = comparison.tests[run].get(key)
    if test is None:
        return False
    return test.ci_low > 0 if HEADLINE[key] == "higher" else test.ci_high < 0


def headline_table(comparison: Comparison) -> str:
    """Runs as rows, headline metrics as columns: value [95% CI]; * marks a paired-test improvement on base."""
    keys = [k for k in HEADLINE if k in comparison.values[comparison.names[0]]]
    lines = ["| run | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in comparison.names:
        cells = []
        for key in keys:
            v = comparison.values[name].get(key)
            star = "*" if name in comparison.tests and _better(comparison, name, key) else ""
            cells.append("-" if v is None else f"{v.value:.3f}{star} [{v.ci_low:.3f}, {v.ci_high:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_table(comparison: Comparison, methods: list[str], seeds: list[int]) -> str:
    """One row per method over seeds: mean (min-max) per headline metric and how many seeds improved on base."""
    keys = [k for k in HEADLINE if k in comparison.values["base"]]
    lines = ["| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    base = [f"{comparison.values['base'][k].value:.3f}" for k in keys]
    lines.append("| base | " + " | ".join(base) + " |")
    for method in methods:
        runs = [f"{method}_s{s}" for s in seeds]
        cells = []
        for key in keys:
            vals = [comparison.values[r][key].value for r in runs]
            wins = sum(_better(comparison, r, key) for r in runs)
            cells.append(f"{sum(vals) / len(vals):.3f} ({min(vals):.3f}-{max(vals):.3f}) {wins}/{len(runs)}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

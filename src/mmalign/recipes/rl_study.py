"""The lab's RL study (Apple arXiv 2407.02477 Sec. 5.5, Table 8): RLOO / GRPO / PPO vs offline DPO and Online-DPO.

``run_rl_study(cfg)`` builds the lab of the base model, makes the exact preference pairs of its preference
prompts (``lab.corrupt``, the external-supervision analogue), and for every seed and method trains from the
same base with the same prompts per step, the same LoRA and the same number of steps:

- ``dpo``: offline DPO on the exact pairs; ``online_dpo``: Online-DPO ranked by the lab oracle;
- ``rloo`` / ``grpo`` / ``ppo``: RL with the lab oracle as reward (normalised with the alignment set);
- ``rloo_rm`` / ``grpo_rm`` / ``ppo_rm``: RL with a trained reward model (``reward_model``: a scalar-head folder,
  ``models.heads``), the lab oracle logged beside it every step.

Every model is evaluated on the held-out lab sets (``evaluation.suite``: every metric the suite produces) and
compared with the base (paired bootstrap). The reward-hacking check reads each RL run's ``metrics.jsonl``:
training reward, oracle score and oracle hallucinated / missed objects per step, plotted over steps
(``report/reward_vs_oracle.png``) and summarised as first-vs-last-steps changes (``report/reward_hacking.md``):
hacking = the reward rises while the oracle's errors rise too. Stages are skipped when their output exists, so a
killed study resumes.
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
from mmalign.evaluation.suite import EvalConfig, compare, evaluate
from mmalign.lab.build import LabConfig, build_lab
from mmalign.lab.corrupt import corrupt_lab_records
from mmalign.recipes.demo import seed_table
from mmalign.recipes.pretrain import BASE_DIR, shipped_base_lab
from mmalign.recipes.rl_report import hacking_table, plot_reward_vs_oracle
from mmalign.models.loading import load_vlm
from mmalign.sampling.annotators import AnnotatorConfig
from mmalign.trainers.common import whole_weights_dir
from mmalign.trainers.offline import OfflineConfig, train_offline
from mmalign.trainers.online import OnlineConfig, train_online
from mmalign.trainers.ppo import PPOConfig, train_ppo
from mmalign.trainers.rloo import RLOOConfig, train_rloo

logger = logging.getLogger(__name__)

METHODS = ("dpo", "online_dpo", "rloo", "grpo", "ppo", "rloo_rm", "grpo_rm", "ppo_rm")


@dataclass
class RLStudyConfig:
    """``base``: "shipped" (the packaged lab base; ``lab`` must be the lab it was trained on) or a model folder
    trained on ``lab``. ``reward_model``: scalar-head folder for the ``*_rm`` methods. Every method runs
    ``steps`` optimizer steps of ``batch_size`` prompts. ``eval_limit`` > 0 evaluates on the first N POPE
    questions and caption prompts only (a quick check). ``dpo``, ``online``, ``rloo`` (also GRPO) and ``ppo``
    are templates; the study fills in model, data, seed, steps and output paths per run."""

    out_dir: str = "runs/rl_study"  # everything the study writes (lab, pairs, runs, evaluations, report)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # one run per seed and method
    methods: list[str] = field(default_factory=lambda: ["dpo", "online_dpo", "rloo", "grpo", "ppo"])  # of METHODS
    base: str = "shipped"  # "shipped" (the packaged lab base) or a model folder trained on this lab
    reward_model: str = ""  # scalar-head reward-model folder for the *_rm methods
    steps: int = 60  # optimizer steps of every method
    batch_size: int = 16  # prompts per step of every method
    eval_limit: int = 0  # > 0: evaluate on the first N POPE questions and caption prompts only
    lab: LabConfig = field(default_factory=LabConfig)
    dpo: OfflineConfig = field(default_factory=OfflineConfig)
    online: OnlineConfig = field(default_factory=OnlineConfig)
    rloo: RLOOConfig = field(default_factory=RLOOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=64))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods or not self.seeds:
            raise ValueError(f"methods: unknown {unknown} (choose from {list(METHODS)}); give methods and seeds")
        if any(m.endswith("_rm") for m in self.methods) and not self.reward_model:
            raise ValueError("the *_rm methods need reward_model (a scalar-head reward-model folder)")
        if self.steps < 1 or self.batch_size < 1 or self.eval_limit < 0:
            raise ValueError("need steps >= 1, batch_size >= 1 and eval_limit >= 0")


@dataclass
class _Job:
    """One training run: the study, its seed and method, and where things are."""

    cfg: RLStudyConfig
    seed: int
    method: str
    lab_dir: Path
    base: Path
    pairs: Path
    out: Path

    def common(self, template: Any) -> Any:
        """``template`` with the base model, the seed, the steps, the batch and the output folder; every step is
        logged (the reward-hacking check reads the curves)."""
        run = dataclasses.replace(template.run, output_dir=str(self.out), seed=self.seed, log_every=1)
        return dataclasses.replace(template, model=dataclasses.replace(template.model, path=str(self.base)),
                                   max_steps=self.cfg.steps, batch_size=self.cfg.batch_size, run=run)

    def reward_source(self) -> AnnotatorConfig:
        if self.method.endswith("_rm"):
            return AnnotatorConfig(kind="reward_model", model=self.cfg.reward_model)
        return AnnotatorConfig(kind="oracle", synonyms=str(self.lab_dir / "vocab/synonyms.txt"))


def _train_dpo(job: _Job) -> None:
    cfg = job.common(job.cfg.dpo)
    train_offline(dataclasses.replace(cfg, merge_weights=cfg.lora.enabled, data=dataclasses.replace(
        cfg.data, train=str(job.pairs), data_root=str(job.lab_dir), skip_invalid_to=str(job.out / "skipped.jsonl"))))


def _train_online(job: _Job) -> None:
    cfg = job.common(job.cfg.online)
    train_online(dataclasses.replace(
        cfg, mode="online", data=dataclasses.replace(cfg.data, prompts=str(job.pairs), data_root=str(job.lab_dir)),
        annotator=AnnotatorConfig(kind="oracle", synonyms=str(job.lab_dir / "vocab/synonyms.txt"))))


def _rl_config(job: _Job, template: Any) -> Any:
    cfg = job.common(template)
    reward = dataclasses.replace(cfg.reward, source=job.reward_source(),
                                 oracle_synonyms=str(job.lab_dir / "vocab/synonyms.txt"))
    return dataclasses.replace(cfg, reward=reward, data=dataclasses.replace(cfg.data, prompts=str(job.pairs),
                                                                            data_root=str(job.lab_dir)))


def _train_rl(job: _Job) -> None:
    name = job.method.removesuffix("_rm")
    if name == "ppo":
        train_ppo(_rl_config(job, job.cfg.ppo))
    else:
        train_rloo(dataclasses.replace(_rl_config(job, job.cfg.rloo), advantage=name))


TRAIN: dict[str, Callable[[_Job], None]] = {"dpo": _train_dpo, "online_dpo": _train_online} | {
    m: _train_rl for m in METHODS if m not in ("dpo", "online_dpo")}


def _once(done: Path, make: Callable[[], Any]) -> None:
    if done.exists():
        logger.info("rl study: %s exists, skipping", done)
    else:
        make()


def _base(cfg: RLStudyConfig) -> Path:
    if cfg.base != "shipped":
        return Path(cfg.base)
    if not cfg.lab.same_base_data(shipped_base_lab()):
        raise ConfigError("base=shipped: the shipped base was trained on another lab than `lab`; keep the lab "
                          "defaults or give base=MODEL_DIR trained on this lab")
    return BASE_DIR


def _eval_files(cfg: RLStudyConfig, lab_dir: Path, out: Path) -> EvalConfig:
    """The evaluation template on this lab, cut to the first ``eval_limit`` items of each file when set."""
    ev = dataclasses.replace(cfg.eval, lab_dir=str(lab_dir))
    if not cfg.eval_limit:
        return ev
    files = {}
    for key, rel in (("pope", ev.pope.file), ("captions", ev.captions.file)):
        if rel:
            lines = (lab_dir / rel).read_text().splitlines()[: cfg.eval_limit]
            files[key] = out / f"eval_{key}_{cfg.eval_limit}.jsonl"
            files[key].parent.mkdir(parents=True, exist_ok=True)
            files[key].write_text("".join(line + "\n" for line in lines))
    return dataclasses.replace(
        ev, pope=dataclasses.replace(ev.pope, file=str(files.get("pope", ""))),
        captions=dataclasses.replace(ev.captions, file=str(files.get("captions", ""))))


def _evaluate(ev: EvalConfig, model_dir: Path, out: Path) -> Path:
    def run() -> None:
        model, processor = load_vlm(model_dir)
        evaluate(dataclasses.replace(ev, out_dir=str(out), model=str(model_dir)), model, processor)

    _once(out / "metrics.json", run)
    return out


def run_rl_study(cfg: RLStudyConfig) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns {"report": path, "runs": {name: eval dir}, ...}."""
    out = Path(cfg.out_dir)
    save_config(cfg, out, "rl_study.yaml")
    lab = dataclasses.replace(cfg.lab, out_dir=str(out / "lab"))
    base = _base(cfg)
    _once(Path(lab.out_dir) / "lab.yaml", lambda: build_lab(lab))
    lab_dir = Path(lab.out_dir)
    ev = _eval_files(cfg, lab_dir, out / "eval_files")
    runs = {"base": _evaluate(ev, base, out / "eval" / "base")}
    trained: dict[str, Path] = {}
    for seed in cfg.seeds:
        pairs = out / f"seed_{seed}" / "pairs" / "external.jsonl"
        _once(pairs, lambda: _external_pairs(lab_dir, pairs, seed))
        for method in cfg.methods:
            job = _Job(cfg, seed, method, lab_dir, base, pairs, out / f"seed_{seed}" / method)
            weights = whole_weights_dir(job.out, True, True) if _lora(cfg, method) else job.out / "model"
            _once(weights / "config.json", lambda: TRAIN[method](job))
            trained[f"{method}_s{seed}"] = job.out
            runs[f"{method}_s{seed}"] = _evaluate(ev, weights, out / "eval" / f"{method}_s{seed}")
    comparison = compare({k: str(v) for k, v in runs.items()}, n_boot=ev.stats.n_boot, seed=ev.stats.seed,
                         level=ev.stats.level)
    report = write_report(comparison, out / "report", {k: str(v) for k, v in runs.items()})
    summary = seed_table({seed: comparison for seed in cfg.seeds}, cfg.methods, "base")
    rl_runs = {k: v for k, v in trained.items() if not k.startswith(("dpo_", "online_dpo_"))}
    hacking = hacking_table(rl_runs)
    if rl_runs:
        plot_reward_vs_oracle(rl_runs, out / "report" / "reward_vs_oracle.png")
    (out / "report" / "reward_hacking.md").write_text(hacking)
    (out / "report" / "summary.md").write_text(
        "# RL study over seeds\n\nPer method: mean (min-max) over seeds, then the number of seeds whose paired "
        "bootstrap test against the base shows less hallucination (95% interval excluding 0).\n\n" + summary
        + "\n## Reward hacking check (first vs last 20% of steps)\n\n" + hacking)
    return {"report": report, "runs": runs, "comparison": comparison, "summary": summary, "hacking": hacking}


def _lora(cfg: RLStudyConfig, method: str) -> bool:
    name = method.removesuffix("_rm")
    template = {"dpo": cfg.dpo, "online_dpo": cfg.online, "ppo": cfg.ppo}.get(name, cfg.rloo)
    return template.lora.enabled


def _external_pairs(lab_dir: Path, path: Path, seed: int) -> None:
    """The preference prompts with the lab's exact corruption as rejected answer (as the demo's ``external``)."""
    bias = json.loads((lab_dir / "bias.json").read_text())["pairs"]
    records = corrupt_lab_records(read_records(lab_dir / "pref_prompts.jsonl", data_root=lab_dir), bias, seed)
    write_records(path, records, provenance={"sampler": "lab_corrupter", "seed": seed})

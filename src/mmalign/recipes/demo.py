"""The ShapesWorld demo: base model -> preference pairs -> DPO -> evaluation, side by side with CIs.

``run_demo(cfg)`` builds the lab, takes the lab base model (the shipped one, or a recipe run), and for
every seed and method makes preference pairs from the lab's preference prompts, trains DPO on them and
evaluates the result on the held-out POPE and captioning sets; then it compares every model with the base
(paired bootstrap on the same samples) and writes a report folder. The methods are the rows of Table 6 of
the Apple paper (Amirloo et al., 2024):

- ``bdhs_noise``: rejected = a BDHS answer with the image diffused (Eq. 9, N = 500) instead of masked;
- ``bdhs``: rejected = a BDHS answer of the base policy itself (Alg. 1, BDHS_attn), no labels at all;
- ``online_bdhs``: BDHS answers regenerated from the current policy during training (``trainers.online``);
- ``external``: rejected = the lab's exact corruption of the reference (the analogue of POVID's GPT-4V data);
- ``external_povid``: the external rejected answer plus POVID's teacher-forced answer under a noised image
  (N = 500), made inside the trainer (``trainers.povid_slot``), averaged with equal weights (Eq. 5);
- ``external_bdhs_noise``, ``external_bdhs``, ``external_online_bdhs``: the external rejected answer plus
  the BDHS_noise / BDHS / online BDHS one, the two DPO losses averaged (Eq. 5, gamma = 0.5);
- ``sft_control`` (not in the paper): the same run with the preference term off (``loss.name=none``), so only
  MM-RLHF's SFT term on the chosen answers trains; every other row is also compared with it, seed by seed, in
  ``report/vs_sft_control_s<seed>`` and ``summary.md``: what the pairs add over their chosen answers alone.

Every stage writes its output before the next starts and is skipped when that output exists, so a killed
demo resumes where it stopped. Numbers shown are read back from the evaluation folders' per-sample records.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mmalign.config import ConfigError, save_config
from mmalign.data.record_files import read_records, write_records
from mmalign.evaluation.report import HEADLINE, verdicts_of, write_report
from mmalign.evaluation.report import headline_table as report_headline_table
from mmalign.evaluation.suite import Comparison, EvalConfig, compare, evaluate
from mmalign.lab.build import LabConfig, SplitSizes, build_lab
from mmalign.lab.corrupt import corrupt_lab_records
from mmalign.recipes.pretrain import BASE_DIR, PretrainConfig, pretrain_base, shipped_base_lab
from mmalign.models.loading import load_vlm
from mmalign.progress import progress
from mmalign.sampling.bdhs import BDHSConfig
from mmalign.sampling.bdhs_run import BDHSRunConfig, run_bdhs
from mmalign.trainers.common import whole_weights_dir
from mmalign.trainers.offline import OfflineConfig, train_offline
from mmalign.trainers.online import OnlineConfig, OnlineDataConfig, train_online

logger = logging.getLogger(__name__)

# Table 6's rows in the paper's order: the policy's own rejected answers alone, then with the external ones.
METHODS = ("bdhs_noise", "bdhs", "online_bdhs", "external", "external_povid", "external_bdhs_noise",
           "external_bdhs", "external_online_bdhs", "sft_control")
CONTROL = "sft_control"
ONLINE = ("online_bdhs", "external_online_bdhs")
# Offline BDHS answers (on the preference prompts), with image noise instead of masking or not; the external
# variants pair the same answers with the corrupted ones (BDHS draws depend on seed and record id only).
BDHS_FILES = {"bdhs": False, "bdhs_noise": True}


def _default_dpo() -> OfflineConfig:
    cfg = OfflineConfig()
    cfg.lora.rank, cfg.lora.alpha = 16, 32
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio = 5e-4, "cosine", 0.1
    cfg.batch_size, cfg.epochs = 16, 2
    # MM-RLHF's SFT term on the chosen answer: with the paper's plain DPO the lab's captions lose objects or
    # degenerate into repeated words (docs/lab.md, Table 6); dpo.loss.sft_weight=0 gives the paper's loss
    cfg.loss.sft_weight = 1.0
    cfg.data.max_length = 384  # 256 image tokens, the prompt and the longest lab answer
    cfg.run = dataclasses.replace(cfg.run, log_every=10, mixed_precision="auto")  # replace resolves "auto"
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
    methods: list[str] = field(default_factory=lambda: ["external", "bdhs", CONTROL])
    base: str = "shipped"  # shipped (the packaged base), recipe (train it) or a model folder trained on this lab
    # the shipped base's lab with half its preference and evaluation images, so the default demo stays under 10
    # minutes on 2 loaded CPU cores; the base's training splits are unchanged (configs/lab_table6.yaml: full size)
    lab: LabConfig = field(default_factory=lambda: LabConfig(sizes=SplitSizes(pref=500, eval=250)))
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    dpo: OfflineConfig = field(default_factory=_default_dpo)
    # BDHS template; a lab model's context is its image tokens + 128, so the unguided answer gets 64 tokens, not
    # the 512 of real models (prompt + reference + budget must fit the context: sampling.bdhs_run)
    bdhs: BDHSConfig = field(default_factory=lambda: BDHSConfig(max_answer_tokens=64))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=64))

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or not self.methods:
            raise ValueError(f"methods: unknown {unknown}; choose from {list(METHODS)}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if CONTROL in self.methods:  # the loss config's own check, here rather than after the base is evaluated
            try:
                dataclasses.replace(self.dpo.loss, name="none")
            except ValueError as err:
                raise ValueError(f"methods: {CONTROL} trains the DPO template with loss.name=none: {err}") from err


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
    """The preference file of ``method`` for ``seed`` (for an online method: its prompt file); images stay in
    the lab (``data_root`` = lab dir)."""
    prompts = lab_dir / "pref_prompts.jsonl"
    external = pairs_dir / "external.jsonl"
    bias = json.loads((lab_dir / "bias.json").read_text())["pairs"]

    def corrupt() -> None:
        records = corrupt_lab_records(read_records(prompts, data_root=lab_dir), bias, seed)
        write_records(external, records, provenance={"sampler": "lab_corrupter", "seed": seed,
                                                     "input": str(prompts)})

    if method.startswith("external") or method == CONTROL:
        _once(external, corrupt)
    # POVID / online slots are made in the trainer; the control reads only the chosen answers (the references)
    if method in ("external", "external_povid", "external_online_bdhs", CONTROL):
        return external
    if method == "online_bdhs":
        return prompts
    own = method.removeprefix("external_")
    answers = pairs_dir / f"{own}.jsonl"
    _once(answers, lambda: _bdhs_pairs(cfg, prompts, lab_dir, base, answers, seed, noise=BDHS_FILES[own]))
    if method == own:
        return answers
    target = pairs_dir / f"{method}.jsonl"  # rejected = [corrupted answer, BDHS answer] (Eq. 5 order)
    _once(target, lambda: _with_external(answers, external, lab_dir, target))
    return target


def _with_external(answers: Path, external: Path, lab_dir: Path, target: Path) -> None:
    """Each BDHS record with the external rejected answer of the same record put first (the BDHS answer last, as
    ``sampling.bdhs.bdhs_record`` orders them and Online-BDHS does)."""
    corrupted = {r.id: r.rejected for r in read_records(external, data_root=lab_dir)}
    records = [dataclasses.replace(r, rejected=corrupted[r.id] + r.rejected)
               for r in read_records(answers, data_root=lab_dir)]
    write_records(target, records, provenance={"sampler": "bdhs+lab_corrupter", "bdhs": str(answers),
                                               "external": str(external)})


def _train_online(cfg: DemoConfig, lab_dir: Path, base: Path, prompts: Path, out: Path, seed: int) -> Path:
    """Online-BDHS with the DPO template's model, LoRA, loss, optimizer and schedule (Eq. 5 when the prompts
    carry an external rejected answer)."""
    d = cfg.dpo
    online = OnlineConfig(
        model=dataclasses.replace(d.model, path=str(base)), lora=d.lora, optim=d.optim,
        run=dataclasses.replace(d.run, output_dir=str(out), seed=seed), batch_size=d.batch_size, epochs=d.epochs,
        max_steps=d.max_steps, forward=d.forward, mode="online_bdhs", loss=d.loss, bdhs=cfg.bdhs,
        data=OnlineDataConfig(prompts=str(prompts), data_root=str(lab_dir), max_length=d.data.max_length))
    weights = whole_weights_dir(out, online.lora.enabled, online.lora.enabled)
    _once(weights / "config.json", lambda: train_online(online))
    return weights


def _train(cfg: DemoConfig, lab_dir: Path, base: Path, pairs: Path, out: Path, seed: int, method: str) -> Path:
    if method in ONLINE:
        return _train_online(cfg, lab_dir, base, pairs, out, seed)
    dpo = dataclasses.replace(
        cfg.dpo,
        merge_weights=cfg.dpo.lora.enabled,  # evaluation loads whole weights: merged (LoRA) or model/ (full FT)
        model=dataclasses.replace(cfg.dpo.model, path=str(base)),
        # A sampler may write a pair the trainer refuses (e.g. a degenerate answer past max_length): count and
        # list it rather than stop the demo.
        data=dataclasses.replace(cfg.dpo.data, train=str(pairs), data_root=str(lab_dir),
                                 skip_invalid_to=str(out / "skipped_pairs.jsonl")),
        run=dataclasses.replace(cfg.dpo.run, output_dir=str(out), seed=seed),
        loss=dataclasses.replace(cfg.dpo.loss, rejected_weights=[0.5, 0.5] if method in (
            "external_bdhs", "external_bdhs_noise") else [], name="none" if method == CONTROL else cfg.dpo.loss.name),
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
    paths = {k: str(v) for k, v in runs.items()}
    comparison = _compare(cfg, paths)
    report = write_report(comparison, out / "report", paths)
    summary = seed_table({seed: comparison for seed in cfg.seeds}, cfg.methods, "base")
    text = ("# Lab summary over seeds\n\nPer method: how many seeds got each verdict against the base, then per "
            "metric the mean (min-max) over seeds and the number of seeds whose paired bootstrap interval lies below "
            "(↓) or above (↑) 0.\n\n" + summary)
    against = _against_control(cfg, paths, out / "report")
    if against:
        _add_control_verdicts(report, against)
        versus = seed_table(against, [m for m in cfg.methods if m != CONTROL], CONTROL)
        summary += "\n" + versus
        text += ("\n## Against the SFT-only control\n\nEvery run against the control of its own seed (the same "
                 "training with the preference term off; reports in `vs_sft_control_s<seed>/`): what the pairs add "
                 "over their chosen answers alone.\n\n" + versus)
    (out / "report" / "summary.md").write_text(text)
    return {"report": report, "runs": runs, "comparison": comparison, "summary": summary, "vs_control": against}


def _compare(cfg: DemoConfig, paths: dict[str, str]) -> Comparison:
    stats = cfg.eval.stats
    return compare(paths, n_boot=stats.n_boot, seed=stats.seed, level=stats.level)


def _against_control(cfg: DemoConfig, paths: dict[str, str], report_dir: Path) -> dict[int, Comparison]:
    """Per seed: every other method's run against that seed's ``sft_control`` run, with its report written to
    ``report_dir/vs_sft_control_s<seed>``; empty without the control."""
    if CONTROL not in cfg.methods:
        return {}
    against = {}
    for seed in cfg.seeds:
        names = [f"{CONTROL}_s{seed}"] + [f"{m}_s{seed}" for m in cfg.methods if m != CONTROL]
        runs = {name: paths[name] for name in names}
        against[seed] = _compare(cfg, runs)
        write_report(against[seed], report_dir / f"vs_{CONTROL}_s{seed}", runs)
    return against


def _add_control_verdicts(report: Path, against: dict[int, Comparison]) -> None:
    """Put every run's verdict against its seed's control into report.md, before the full metric table."""
    lines = ["## Against the SFT-only control", "",
             f"Each run against `{CONTROL}` of its seed, the same training with the preference term off: what the "
             f"pairs add over their chosen answers alone (reports: `vs_{CONTROL}_s<seed>/report.md`).", ""]
    for comparison in against.values():
        for run, v in verdicts_of(comparison).items():
            lines.append(f"- **{run}**: **{v.label}**" + "".join(f"; {r}" for r in v.reasons))
    text = report.read_text()
    report.write_text(text.replace("## All metrics", "\n".join(lines) + "\n\n## All metrics", 1))


def headline_table(comparison: Comparison) -> str:
    """Runs as rows: the verdict against the base, then hallucination and coverage side by side
    (``evaluation.report.headline_table``)."""
    return report_headline_table(comparison, verdicts_of(comparison))


def mean_range(values: list[float]) -> str:
    """mean (min-max) over seeds; the mean alone for one seed or equal values."""
    spread = f" ({min(values):.3f}-{max(values):.3f})" if min(values) != max(values) else ""
    return f"{sum(values) / len(values):.3f}{spread}"


def _cell(values: list[float], tests: list[Any]) -> str:
    down = sum(t.ci_high < 0 for t in tests)
    up = sum(t.ci_low > 0 for t in tests)
    return f"{mean_range(values)} ↓{down} ↑{up}"


def seed_table(comparisons: dict[int, Comparison], methods: list[str], reference: str) -> str:
    """One row per method over seeds (``comparisons``: seed -> runs against that seed's reference run, named
    ``<method>_s<seed>``): how many seeds got each verdict, then per headline metric the mean (min-max) over seeds
    and how many seeds moved it down (↓) or up (↑) beyond the paired interval. The first row is ``reference``."""
    first = next(iter(comparisons.values()))
    keys = [k for k in HEADLINE if k in first.values[first.names[0]]]
    verdicts = {seed: verdicts_of(c) for seed, c in comparisons.items()}
    lines = [f"| method | verdicts vs {reference} | " + " | ".join(HEADLINE[k] for k in keys) + " |",
             "|---" * (len(keys) + 2) + "|"]
    refs = [c.values[c.names[0]] for c in comparisons.values()]
    lines.append(f"| {reference} | - | " + " | ".join(mean_range([r[k].value for r in refs]) for k in keys) + " |")
    for method in methods:
        runs = {seed: f"{method}_s{seed}" for seed in comparisons}
        labels = Counter(verdicts[seed][run].label for seed, run in runs.items())
        cells = [_cell([comparisons[s].values[r][k].value for s, r in runs.items()],
                       [comparisons[s].tests[r][k] for s, r in runs.items()]) for k in keys]
        verdict_cell = "; ".join(f"{label} {n}/{len(runs)}" for label, n in labels.most_common())
        lines.append(f"| {method} | {verdict_cell} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

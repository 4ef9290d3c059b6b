"""The reward-model study in the ShapesWorld lab: how well reward models trained on each pair source rank held-out
pairs of every source (Apple arXiv 2407.02477 Table 7's analogue), and MM-DPO with reward-model margins (MM-RLHF
arXiv 2502.10391 Sec. 4) against plain DPO and DPO + SFT on the same pairs.

Per seed, every stage writes its output before the next starts and is skipped when that output exists, so a killed
study resumes where it stopped:

1. pair sources on the lab's preference prompts (``max_prompts`` of them; a fixed ``heldout_share`` of the prompts,
   by id hash, is held out): ``corrupt`` (the lab's exact corruption of the reference), ``bdhs`` (BDHS answers of
   the base), ``povid`` (POVID's teacher-forced argmax answer under a noised image), ``online`` (``online_k``
   samples of the base ranked by the lab oracle, best vs worst); every pair's label is exact, so a reward model's
   accuracy is its agreement with the lab's ground truth;
2. one Bradley-Terry reward model per source on its RM-train pairs, and (``critique``) MM-RLHF's critique-based one
   on the corrupt pairs with the lab's exact critiques (``mmalign.lab.critiques``);
3. the cross-set matrix: every reward model on every source's held-out pairs (ACC, ACC+ with bootstrap CIs);
4. the ``dpo_source`` pairs of the RM-train prompts scored by the ``margin_model`` reward model (``mmalign score``),
   then DPO, DPO + SFT (``sft_weight``) and MM-DPO (per-pair dynamic beta from the margins + the same SFT term) on
   those scored pairs, each evaluated with the lab suite and tested against the base on every metric it reports.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

from mmalign.config import ConfigError, save_config
from mmalign.data.images import open_image
from mmalign.data.record_files import read_records, write_records
from mmalign.data.schema import PreferenceRecord
from mmalign.evaluation.report import write_report
from mmalign.evaluation.reward_bench import CrossSetConfig, RewardEvalConfig, cross_set_matrix, evaluate_reward_model
from mmalign.evaluation.stats import MetricValue
from mmalign.evaluation.suite import Comparison, EvalConfig, compare, evaluate
from mmalign.lab.build import LabConfig, build_lab
from mmalign.lab.corrupt import corrupt_lab_records
from mmalign.lab.critiques import with_lab_critiques
from mmalign.recipes.demo import mean_range
from mmalign.recipes.pretrain import BASE_DIR, shipped_base_lab
from mmalign.models.loading import load_vlm
from mmalign.sampling.annotators import Annotation, LabOracle, RolloutGroup, read_synonyms
from mmalign.sampling.bdhs import BDHSConfig
from mmalign.sampling.bdhs_run import BDHSRunConfig, run_bdhs
from mmalign.sampling.generate import GenerationParams, generate
from mmalign.sampling.povid import povid_rejected_answers
from mmalign.sampling.reward_scoring import ScorerConfig
from mmalign.sampling.score_run import ScoreConfig, run_score
from mmalign.trainers.common import whole_weights_dir
from mmalign.trainers.offline import OfflineConfig, train_offline
from mmalign.trainers.reward_model import MODEL_DIR, RewardModelConfig, train_reward_model

logger = logging.getLogger(__name__)

SOURCES = ("corrupt", "bdhs", "povid", "online")
VARIANTS = ("dpo", "dpo_sft", "mm_dpo")


def _default_rm() -> RewardModelConfig:
    cfg = RewardModelConfig()
    cfg.lora.rank, cfg.lora.alpha = 16, 32
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio = 5e-4, "constant", 0.03
    cfg.batch_size, cfg.epochs = 16, 3
    cfg.data.max_length = 384  # the lab base's context: 256 image tokens + 128 text tokens
    cfg.critique.separator = ": "  # in the lab tokenizer's words
    return cfg


def _default_dpo() -> OfflineConfig:
    cfg = OfflineConfig()
    cfg.lora.rank, cfg.lora.alpha = 16, 32
    cfg.optim.lr, cfg.optim.schedule, cfg.optim.warmup_ratio = 5e-4, "cosine", 0.1
    cfg.batch_size, cfg.epochs = 16, 2
    cfg.data.max_length = 384
    return cfg


@dataclass
class RMStudyConfig:
    """``base``: "shipped" (the packaged lab base; ``lab`` must be the lab it was trained on) or a model folder
    trained on ``lab``. ``rm``, ``dpo``, ``score``, ``rm_eval`` and ``eval`` are templates; the study fills in the
    model, data and output paths per run."""

    out_dir: str = "runs/rm_study"  # everything the study writes (lab, pairs, models, evaluations, report)
    seeds: list[int] = field(default_factory=lambda: [0])  # each seed redraws pairs and retrains every model
    base: str = "shipped"  # "shipped" (the packaged lab base) or a model folder trained on `lab`
    lab: LabConfig = field(default_factory=LabConfig)  # the lab (docs/lab.md); built under out_dir/lab
    max_prompts: int = 0  # preference prompts used (0 = all), the first ones of the lab's file
    heldout_share: float = 0.2  # share of prompts (by id hash) whose pairs only evaluate reward models
    sources: list[str] = field(default_factory=lambda: list(SOURCES))  # pair sources: corrupt, bdhs, povid, online
    critique: bool = True  # also train the critique-based reward model (on the corrupt pairs)
    # which reward model scores the DPO pairs: the critique one, or the Bradley-Terry one of dpo_source
    margin_model: Literal["bradley_terry", "critique"] = "critique"
    dpo_source: str = "corrupt"  # the pairs DPO, DPO + SFT and MM-DPO train on (its RM-train prompts)
    sft_weight: float = 0.25  # SFT term of DPO + SFT and MM-DPO (MM-RLHF's DPO script: gamma 0.25)
    beta_w: float = 0.5  # MM-DPO w (paper default)
    beta_k: float = 0.5  # MM-DPO k (paper default)
    povid_noise_steps: int = 500  # diffusion steps of the povid source's noised image
    online_k: int = 4  # samples of the base per prompt for the online source
    online_temperature: float = 1.0  # their sampling temperature
    rm: RewardModelConfig = field(default_factory=_default_rm)  # reward-model template (paths filled in)
    dpo: OfflineConfig = field(default_factory=_default_dpo)  # DPO template (paths, SFT weight, MM-DPO filled in)
    # the bdhs source's sampler (seed filled in); lab answers are short and the lab base's context is 384 tokens
    bdhs: BDHSConfig = field(default_factory=lambda: BDHSConfig(max_answer_tokens=64))
    # mmalign score settings for the DPO pairs (paths filled in)
    score: ScoreConfig = field(default_factory=lambda: ScoreConfig(scorer=ScorerConfig(critique_tokens=64,
                                                                                       batch_size=16)))
    # reward-model evaluation settings of the matrix cells (paths filled in)
    rm_eval: RewardEvalConfig = field(default_factory=lambda: RewardEvalConfig(
        scorer=ScorerConfig(critique_tokens=64, batch_size=16)))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(batch_size=64))  # the lab evaluation of each model

    def __post_init__(self) -> None:
        unknown = sorted(set(self.sources) - set(SOURCES))
        if unknown or not self.sources or self.dpo_source not in self.sources:
            raise ValueError(f"sources must be a non-empty subset of {list(SOURCES)} holding dpo_source, got "
                             f"{self.sources} / {self.dpo_source!r}")
        if not 0 < self.heldout_share < 1 or self.max_prompts < 0 or self.online_k < 2 or not self.seeds:
            raise ValueError("need 0 < heldout_share < 1, max_prompts >= 0, online_k >= 2 and >= 1 seed")
        if self.margin_model == "critique" and not self.critique:
            raise ValueError("margin_model=critique needs critique=true")


def _once(done: Path, make: Callable[[], Any]) -> Path:
    """Run ``make`` unless ``done`` (a stage's final output) exists; a rerun resumes after the last stage."""
    if not done.exists():
        make()
    return done


def _base(cfg: RMStudyConfig) -> Path:
    if cfg.base != "shipped":
        return Path(cfg.base)
    if not cfg.lab.same_base_data(shipped_base_lab()):
        raise ConfigError(f"base=shipped: the shipped base was trained on another lab than `lab` "
                          f"({BASE_DIR / 'recipe.yaml'}); keep the lab defaults or give base=<model folder>")
    return BASE_DIR


def is_heldout(record_id: str, share: float) -> bool:
    """A fixed split of the preference prompts: a hash of the id, not of the seed or the order."""
    return int.from_bytes(hashlib.sha256(record_id.encode()).digest()[:8], "little") / 2**64 < share


def _images(records: list[PreferenceRecord], lab_dir: Path) -> list[list[Any]]:
    return [[open_image(ref, lab_dir) for ref in r.images] for r in records]


def _online_pairs(cfg: RMStudyConfig, prompts: list[PreferenceRecord], lab_dir: Path, base: Path,
                  seed: int) -> list[PreferenceRecord]:
    """``online_k`` samples of the base per prompt ranked by the lab oracle: best chosen, worst rejected."""
    model, processor = load_vlm(base)
    images = _images(prompts, lab_dir)
    params = GenerationParams(max_new_tokens=64, temperature=cfg.online_temperature)
    flat = generate(model, processor, [r.prompt for r in prompts for _ in range(cfg.online_k)],
                    [i for i in images for _ in range(cfg.online_k)], params, seed=seed, batch_size=64)
    groups = [RolloutGroup(r, imgs, flat[n * cfg.online_k:(n + 1) * cfg.online_k])
              for n, (r, imgs) in enumerate(zip(prompts, images))]
    oracle = LabOracle(read_synonyms(lab_dir / "vocab" / "synonyms.txt"))
    return oracle_pair_records(groups, oracle.annotate(groups))


def oracle_pair_records(groups: list[RolloutGroup], annotations: list[Annotation]) -> list[PreferenceRecord]:
    """Best vs worst answer of each group as a record with the group's id; groups without a preference, or whose
    best or worst answer is empty (a sample may stop at once; records refuse empty text), are dropped, as
    Online-DPO drops them."""
    pairs = [(g, a, a.pair_texts(g.answers)) for g, a in zip(groups, annotations)]
    return [dataclasses.replace(g.record, chosen=texts[0], rejected=[texts[1]],
                                meta=g.record.meta | {"oracle_scores": a.verdict["scores"]})
            for g, a, texts in pairs if texts is not None]


def _povid_pairs(cfg: RMStudyConfig, prompts: list[PreferenceRecord], lab_dir: Path, base: Path,
                 seed: int) -> list[PreferenceRecord]:
    """Rejected = POVID's teacher-forced argmax answer under the noised image; copies of the reference dropped."""
    model, processor = load_vlm(base)
    answers = povid_rejected_answers(model, processor, prompts, _images(prompts, lab_dir), cfg.povid_noise_steps, seed)
    return [dataclasses.replace(r, rejected=[a]) for r, a in zip(prompts, answers) if a and a != r.chosen]


def make_pairs(cfg: RMStudyConfig, source: str, prompts_file: Path, lab_dir: Path, base: Path, out: Path,
               seed: int) -> Path:
    """The pair file of ``source`` on every prompt of ``prompts_file`` (images stay in the lab)."""
    def write(records: list[PreferenceRecord]) -> None:
        write_records(out, records, provenance={"sampler": f"rm_study_{source}", "seed": seed,
                                                "input": str(prompts_file), "model": str(base)})

    prompts = read_records(prompts_file, data_root=lab_dir)
    if source == "bdhs":
        run_bdhs(BDHSRunConfig(input=str(prompts_file), output=str(out), model=str(base), data_root=str(lab_dir),
                               bdhs=dataclasses.replace(cfg.bdhs, seed=seed)))
    elif source == "corrupt":
        write(corrupt_lab_records(prompts, json.loads((lab_dir / "bias.json").read_text())["pairs"], seed))
    elif source == "povid":
        write(_povid_pairs(cfg, prompts, lab_dir, base, seed))
    else:
        write(_online_pairs(cfg, prompts, lab_dir, base, seed))
    return out


def split_pairs(pairs: Path, share: float, lab_dir: Path) -> tuple[Path, Path]:
    """``<name>_train.jsonl`` / ``<name>_heldout.jsonl`` beside ``pairs`` (split by ``is_heldout`` of the id)."""
    train, heldout = pairs.with_name(pairs.stem + "_train.jsonl"), pairs.with_name(pairs.stem + "_heldout.jsonl")
    if not heldout.exists():
        records = read_records(pairs, data_root=lab_dir)
        write_records(train, [r for r in records if not is_heldout(r.id, share)])
        write_records(heldout, [r for r in records if is_heldout(r.id, share)])
    return train, heldout


def _with_critiques(pairs: Path, lab_dir: Path) -> Path:
    """``<name>_critiques.jsonl`` beside ``pairs``: its records with the lab's exact critiques (written once)."""
    out = pairs.with_name(pairs.stem + "_critiques.jsonl")
    _once(out, lambda: write_records(out, with_lab_critiques(read_records(pairs, data_root=lab_dir))))
    return out


def train_rm(cfg: RMStudyConfig, data: Path, lab_dir: Path, base: Path, out: Path, seed: int, critique: bool) -> Path:
    """A reward model on ``data`` (a critique-based one on ``data`` with the lab's exact critiques)."""
    if critique:
        data = _with_critiques(data, lab_dir)
    rm = dataclasses.replace(
        cfg.rm, model=dataclasses.replace(cfg.rm.model, path=str(base)),
        data=dataclasses.replace(cfg.rm.data, train=str(data), data_root=str(lab_dir),
                                 skip_invalid_to=str(out / "skipped_pairs.jsonl")),
        run=dataclasses.replace(cfg.rm.run, output_dir=str(out), seed=seed),
        critique=dataclasses.replace(cfg.rm.critique, enabled=critique))
    return _once(out / MODEL_DIR / "reward_model.json", lambda: train_reward_model(rm)).parent


def _dpo(cfg: RMStudyConfig, variant: str, pairs: Path, lab_dir: Path, base: Path, out: Path, seed: int) -> Path:
    mm = variant == "mm_dpo"
    dpo = dataclasses.replace(
        cfg.dpo, merge_weights=cfg.dpo.lora.enabled, model=dataclasses.replace(cfg.dpo.model, path=str(base)),
        data=dataclasses.replace(cfg.dpo.data, train=str(pairs), data_root=str(lab_dir),
                                 skip_invalid_to=str(out / "skipped_pairs.jsonl")),
        run=dataclasses.replace(cfg.dpo.run, output_dir=str(out), seed=seed),
        loss=dataclasses.replace(cfg.dpo.loss, sft_weight=0.0 if variant == "dpo" else cfg.sft_weight,
                                 dynamic_beta=mm, beta_w=cfg.beta_w, beta_k=cfg.beta_k))
    weights = whole_weights_dir(out, dpo.lora.enabled, dpo.merge_weights)
    return _once(weights / "config.json", lambda: train_offline(dpo)).parent


def _evaluate(cfg: RMStudyConfig, lab_dir: Path, model_dir: Path, out: Path) -> Path:
    def run() -> None:
        model, processor = load_vlm(model_dir)
        evaluate(dataclasses.replace(cfg.eval, lab_dir=str(lab_dir), out_dir=str(out), model=str(model_dir)),
                 model, processor)

    return _once(out / "metrics.json", run).parent


def critique_check(cell: RewardEvalConfig, heldout: Path, model: Path, lab_dir: Path, out: Path) -> Path:
    """The critique RM on the held-out corrupt pairs given the lab's exact critiques instead of its own: with the
    matrix cell (its written critiques) this tells a weak score head from weak critique writing."""
    given = _with_critiques(heldout, lab_dir)
    _once(out / "metrics.json", lambda: evaluate_reward_model(dataclasses.replace(
        cell, data=str(given), model=str(model), out_dir=str(out),
        scorer=dataclasses.replace(cell.scorer, critiques="given"))))
    return out


def run_seed(cfg: RMStudyConfig, lab_dir: Path, prompts: Path, base: Path, seed: int) -> dict[str, Path]:
    """Pairs, reward models, matrix, scored DPO pairs and the three DPO variants of one seed; returns the
    evaluation folder of each variant (``<variant>_s<seed>``)."""
    root = Path(cfg.out_dir) / f"seed_{seed}"
    splits = {}
    for source in cfg.sources:
        pairs = _once(root / "pairs" / f"{source}.jsonl",
                      lambda s=source: make_pairs(cfg, s, prompts, lab_dir, base, root / "pairs" / f"{s}.jsonl", seed))
        splits[source] = split_pairs(pairs, cfg.heldout_share, lab_dir)
    models = {source: train_rm(cfg, splits[source][0], lab_dir, base, root / "rm" / source, seed, critique=False)
              for source in cfg.sources}
    if cfg.critique:
        models["critique"] = train_rm(cfg, splits["corrupt"][0], lab_dir, base, root / "rm" / "critique", seed,
                                      critique=True)
    cell = dataclasses.replace(cfg.rm_eval, data_root=str(lab_dir), seed=seed,
                               scorer=dataclasses.replace(cfg.rm_eval.scorer, seed=seed))
    cross_set_matrix(CrossSetConfig(models={k: str(v) for k, v in models.items()},
                                    sets={k: str(v[1]) for k, v in splits.items()}, out_dir=str(root / "rm_matrix"),
                                    eval=cell))
    if cfg.critique:
        critique_check(cell, splits["corrupt"][1], models["critique"], lab_dir, root / "critique_given")
    margin_rm = models["critique" if cfg.margin_model == "critique" else cfg.dpo_source]
    scored = root / "pairs" / f"{cfg.dpo_source}_train_scored.jsonl"
    _once(scored, lambda: run_score(dataclasses.replace(
        cfg.score, input=str(splits[cfg.dpo_source][0]), output=str(scored), model=str(margin_rm),
        data_root=str(lab_dir), scorer=dataclasses.replace(cfg.score.scorer, seed=seed))))
    return {f"{variant}_s{seed}": _evaluate(cfg, lab_dir, _dpo(cfg, variant, scored, lab_dir, base,
                                                                 root / variant, seed),
                                            Path(cfg.out_dir) / "eval" / f"{variant}_s{seed}")
            for variant in VARIANTS}


def _cell(values: list[MetricValue], tests: list[Any]) -> str:
    """mean (min-max) over seeds, then how many seeds' paired tests put the metric above (+) / below (-) base."""
    up = sum(t is not None and t.ci_low > 0 for t in tests)
    down = sum(t is not None and t.ci_high < 0 for t in tests)
    return f"{mean_range([v.value for v in values])} +{up}/-{down}"


def metric_table(comparison: Comparison, seeds: list[int]) -> str:
    """Every metric the evaluation reports (rows) per variant (columns): ``_cell`` over seeds, base first."""
    base = comparison.values["base"]
    keys = [k for k in base if all(k in comparison.values[n] for n in comparison.names)]
    lines = ["| metric | base | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 2) + "|"]
    for key in keys:
        cells = []
        for variant in VARIANTS:
            runs = [f"{variant}_s{s}" for s in seeds]
            cells.append(_cell([comparison.values[r][key] for r in runs],
                               [comparison.tests[r].get(key) for r in runs]))
        lines.append(f"| {key} | {base[key].value:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_matrix(matrices: dict[int, dict[str, dict[str, Any]]], metric: str = "accuracy") -> str:
    """Markdown: ``metric`` per reward model (rows) and held-out set (columns), mean (min-max) over the seeds'
    ``matrix.json`` (``cross_set_matrix``'s {model: {set: evaluation}})."""
    first = next(iter(matrices.values()))
    sets = list(next(iter(first.values())))
    lines = [f"| {metric}: model \\ held-out set | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for model in first:
        cells = [mean_range([m[model][name]["metrics"][metric]["value"] for m in matrices.values()])
                 for name in sets]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _critique_lines(out: Path, matrices: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Per seed: the critique RM's held-out corrupt accuracy with its written critiques (the seed's matrix) and
    with the exact ones."""
    lines = ["| seed | critique RM, written critiques | critique RM, exact critiques |", "|---|---|---|"]
    for seed, matrix in matrices.items():
        written = matrix["critique"]["corrupt"]
        given = json.loads((out / f"seed_{seed}" / "critique_given" / "metrics.json").read_text())
        lines.append(f"| {seed} | {written['metrics']['accuracy']['value']:.3f} | "
                     f"{given['metrics']['accuracy']['value']:.3f} |")
    return "\n".join(lines) + "\n"


def run_rm_study(cfg: RMStudyConfig) -> dict[str, Any]:
    """Run every stage (skipping finished ones); returns {"report", "runs", "comparison", "table", "matrices",
    "over_seeds"}."""
    out = Path(cfg.out_dir)
    save_config(cfg, out, "rm_study.yaml")
    lab = dataclasses.replace(cfg.lab, out_dir=str(out / "lab"))
    lab_dir = Path(lab.out_dir)
    base = _base(dataclasses.replace(cfg, lab=lab))
    _once(lab_dir / "lab.yaml", lambda: build_lab(lab))
    prompts = out / "prompts.jsonl"
    _once(prompts, lambda: write_records(prompts, read_records(lab_dir / "pref_prompts.jsonl", data_root=lab_dir)[
        : cfg.max_prompts or None]))
    runs = {"base": _evaluate(cfg, lab_dir, base, out / "eval" / "base")}
    for seed in cfg.seeds:
        logger.info("rm study: seed %d", seed)
        runs |= run_seed(cfg, lab_dir, prompts, base, seed)
    comparison = compare({k: str(v) for k, v in runs.items()}, n_boot=cfg.eval.stats.n_boot,
                         seed=cfg.eval.stats.seed, level=cfg.eval.stats.level)
    report = write_report(comparison, out / "report", {k: str(v) for k, v in runs.items()})
    table = metric_table(comparison, cfg.seeds)
    matrices = {s: (out / f"seed_{s}" / "rm_matrix" / "matrix.md").read_text() for s in cfg.seeds}
    loaded = {s: json.loads((out / f"seed_{s}" / "rm_matrix" / "matrix.json").read_text()) for s in cfg.seeds}
    over_seeds = seeds_matrix(loaded)
    if cfg.critique:
        over_seeds += "\n" + _critique_lines(out, loaded)
    (out / "report" / "rm_study.md").write_text(
        "# Reward-model study\n\n## DPO variants vs base, every metric\n\nmean (min-max) over seeds; +u/-d: seeds "
        "whose paired bootstrap test puts the metric above / below the base (95% interval excluding 0).\n\n"
        + table + f"\n## Reward models over seeds (accuracy, mean (min-max))\n\n{over_seeds}"
        + "".join(f"\n## Reward models, seed {s}\n\n{m}" for s, m in matrices.items()))
    return {"report": report, "runs": runs, "comparison": comparison, "table": table, "matrices": matrices,
            "over_seeds": over_seeds}

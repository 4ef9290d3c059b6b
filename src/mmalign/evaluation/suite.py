"""The evaluation suite: POPE (every split) and captioning (CHAIR, lab co-occurrence) on one model.

``evaluate(cfg)`` loads a model from a local path (or takes one in-process), scores the evaluation files of
a built lab dir (or user files in the same formats, see ``mmalign.evaluation.items``) and writes into
``cfg.out_dir``:

- ``config.yaml``: the resolved config and its hash;
- ``metrics.json``: every metric as ``{"value", "n", "ci_low", "ci_high"}`` under a flat key
  (``pope/<split>/<metric>``, ``pope/all/<metric>``, ``chair/<metric>``, ``chair/probe|plain/<metric>``,
  ``cooccur/<metric>``, ``pope_bias/<metric>`` and, for POPE items with a ``stratum``,
  ``pope_bias/stratum/<label>/<metric>``), with the bootstrap settings and the bias pairs used;
- ``samples_pope.jsonl`` / ``samples_captions.jsonl``: one record per sample (prompt, answer, parsed
  answer, truth, mentions, ...), from which ``compare`` recomputes metrics for paired tests.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from mmalign.config import config_hash, save_config, to_dict
from mmalign.data.images import open_image
from mmalign.data.io import read_jsonl_lines, write_jsonl
from mmalign.evaluation.chair import CHAIR_METRICS, Vocabulary, chair_columns, chair_record, load_synonyms
from mmalign.evaluation.cooccur import (
    COOCCUR_METRICS, POPE_BIAS_METRICS, cooccur_columns, cooccur_record, pope_bias_columns, pope_bias_metrics,
    pope_bias_records, pope_bias_strata, pope_bias_strata_columns,
)
from mmalign.evaluation.items import load_bias_pairs, load_caption_items, load_pope_items
from mmalign.evaluation.pope import POPE_METRICS, YES_RATE_METRICS, pope_columns
from mmalign.evaluation.scoring import generate_captions, score_pope_generate, score_pope_likelihood
from mmalign.evaluation.stats import MetricFn, MetricValue, PairedResult, bootstrap, paired_bootstrap
from mmalign.progress import in_batches
from mmalign.tracking import Trackers, check_report_to

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
POPE_SAMPLES = "samples_pope.jsonl"
CAPTION_SAMPLES = "samples_captions.jsonl"
# Lab split names first, in the order POPE reports them; any other split of a user file follows.
SPLIT_ORDER = ("random", "popular", "adversarial")


@dataclass
class PopeConfig:
    """POPE questions (empty ``file`` skips POPE) and how they are scored: ``generate`` (greedy answers parsed as
    LLaVA's script does: what papers report, and one prefill per question) or ``likelihood`` (the candidate
    answer with the higher summed log-prob)."""

    file: str = "eval/pope.jsonl"  # POPE questions relative to lab_dir ("": skip POPE)
    # generate (greedy answer, parsed as LLaVA does) or likelihood (the likelier of the candidates)
    scorer: Literal["likelihood", "generate"] = "generate"
    # likelihood: the answers compared (a yes and a no)
    candidates: list[str] = field(default_factory=lambda: ["Yes.", "No."])
    max_new_tokens: int = 16  # generate: most tokens per answer


@dataclass
class CaptionConfig:
    """Captioning prompts (empty ``file`` skips captioning), CHAIR vocabulary and the lab's bias pairs.

    An empty ``bias`` skips the co-occurrence metrics (files without a bias definition).
    """

    file: str = "eval/captions.jsonl"  # captioning prompts relative to lab_dir ("": skip captioning)
    synonyms: str = "vocab/synonyms.txt"  # CHAIR vocabulary relative to lab_dir
    bias: str = "bias.json"  # bias pairs relative to lab_dir ("": skip the co-occurrence metrics)
    max_new_tokens: int = 64  # most tokens per caption


@dataclass
class StatsConfig:
    n_boot: int = 1000  # bootstrap resamples of the confidence intervals
    level: float = 0.95  # confidence level of the intervals
    seed: int = 0  # seed of the bootstrap

    def __post_init__(self) -> None:
        if self.n_boot < 1 or not 0.0 < self.level < 1.0:
            raise ValueError(f"stats: need n_boot >= 1 and 0 < level < 1, got {self.n_boot}, {self.level}")


@dataclass
class EvalConfig:
    """``model``: local model dir loaded in ``dtype`` (both unused when a model is passed in-process);
    relative paths of the evaluation files resolve against ``lab_dir``, as do the image paths inside them."""

    model: str = ""  # local model folder to evaluate
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # dtype the model is loaded in
    lab_dir: str = ""  # folder the evaluation files (and their image paths) are relative to
    out_dir: str = "runs/eval"  # where metrics.json and the per-sample records go
    seed: int = 0  # generation seed
    batch_size: int = 16  # questions / prompts per forward pass (speed only)
    pope: PopeConfig = field(default_factory=PopeConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)
    # trackers that also receive the metric values (tensorboard, wandb, mlflow; none): see mmalign.tracking
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])

    def __post_init__(self) -> None:
        self.report_to = check_report_to(self.report_to)
        if not self.pope.file and not self.captions.file:
            raise ValueError("nothing to evaluate: pope.file and captions.file are both empty")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def _existing(root: Path, rel: str, key: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"{key}: {path} does not exist (set {key}='' to skip it)")
    return path


def _open_images(refs: list[str], root: Path) -> list[Image.Image]:
    """Images of the items, each distinct file opened once (POPE asks several questions per image)."""
    cache: dict[str, Image.Image] = {}
    for ref in refs:
        if ref not in cache:
            cache[ref] = open_image(ref, root)
    return [cache[ref] for ref in refs]


@dataclass(frozen=True)
class EvalInputs:
    """Everything an evaluation reads, loaded and validated before any model runs (``*_images[i]`` is the
    image of ``*_items[i]``); parts that are switched off are empty."""

    pope_items: list[dict[str, Any]]
    pope_images: list[Image.Image]
    caption_items: list[dict[str, Any]]
    caption_images: list[Image.Image]
    vocab: Vocabulary | None
    pairs: list[tuple[str, str]]


def _check_classes(caption_items: list[dict[str, Any]], pairs: list[tuple[str, str]], vocab: Vocabulary,
                   captions_path: Path, vocab_path: Path) -> None:
    known = set(vocab.classes)
    for item in caption_items:
        unknown = sorted(set(item["objects"]) - known)
        if unknown:
            raise ValueError(f"{captions_path} (id {item['id']!r}): field 'objects' holds {unknown}, which are "
                             f"not classes of {vocab_path}")
    unknown = sorted({o for pair in pairs for o in pair} - known)
    if unknown:
        raise ValueError(f"bias pairs name {unknown}, which are not classes of {vocab_path}")


def load_inputs(cfg: EvalConfig) -> EvalInputs:
    """Read and check every evaluation file and image of ``cfg`` (relative to ``cfg.lab_dir``)."""
    root = Path(cfg.lab_dir)
    pairs = load_bias_pairs(_existing(root, cfg.captions.bias, "captions.bias")) if cfg.captions.bias else []
    pope_items = load_pope_items(_existing(root, cfg.pope.file, "pope.file")) if cfg.pope.file else []
    reserved = [it["id"] for it in pope_items if it["split"] == "all"]
    if reserved:
        raise ValueError(f"{cfg.pope.file} (id {reserved[0]!r}): split 'all' is reserved for the pooled metrics")
    caption_items: list[dict[str, Any]] = []
    vocab = None
    if cfg.captions.file:
        captions_path = _existing(root, cfg.captions.file, "captions.file")
        vocab_path = _existing(root, cfg.captions.synonyms, "captions.synonyms")
        caption_items = load_caption_items(captions_path)
        vocab = load_synonyms(vocab_path)
        _check_classes(caption_items, pairs, vocab, captions_path, vocab_path)
    return EvalInputs(pope_items, _open_images([it["image"] for it in pope_items], root), caption_items,
                      _open_images([it["image"] for it in caption_items], root), vocab, pairs)


def run_pope(model: Any, processor: Any, cfg: EvalConfig, inputs: EvalInputs) -> list[dict[str, Any]]:
    """Per-question records of ``cfg.pope.scorer`` over the POPE items."""
    items, images = inputs.pope_items, inputs.pope_images
    logger.info("POPE: %d questions, scorer %s", len(items), cfg.pope.scorer)
    records = []
    for part in in_batches(range(len(items)), cfg.batch_size, f"POPE ({cfg.pope.scorer})", unit="q"):
        batch, batch_images = items[part.start:part.stop], images[part.start:part.stop]
        if cfg.pope.scorer == "likelihood":
            records += score_pope_likelihood(model, processor, batch, batch_images, candidates=cfg.pope.candidates,
                                             batch_size=cfg.batch_size)
        else:  # greedy: answers do not depend on how the questions are split
            records += score_pope_generate(model, processor, batch, batch_images,
                                           max_new_tokens=cfg.pope.max_new_tokens, batch_size=cfg.batch_size,
                                           seed=cfg.seed)
    return records


def run_captions(model: Any, processor: Any, cfg: EvalConfig, inputs: EvalInputs) -> list[dict[str, Any]]:
    """Per-caption records: prompt, answer, CHAIR mentions and, with bias pairs, co-occurrence units."""
    items = inputs.caption_items
    logger.info("captions: %d prompts", len(items))
    answers = []
    for part in in_batches(range(len(items)), cfg.batch_size, "captions", unit="cap"):  # greedy, as above
        answers += generate_captions(model, processor, items[part.start:part.stop],
                                     inputs.caption_images[part.start:part.stop],
                                     max_new_tokens=cfg.captions.max_new_tokens, batch_size=cfg.batch_size,
                                     seed=cfg.seed)
    records = []
    for item, answer in zip(items, answers):
        record = chair_record(item["id"], answer, item["objects"], inputs.vocab)
        cooc = cooccur_record(record, inputs.pairs)
        records.append({"id": item["id"], "image": item["image"], "prompt": item["prompt"], **record,
                        "units": cooc["units"] if cooc else []})
    return records


@dataclass(frozen=True)
class MetricGroup:
    """Samples (``ids`` [n], in order) with their per-sample ``columns`` and the metrics they define."""

    ids: list[str]
    columns: dict[str, np.ndarray]
    metrics: dict[str, MetricFn]


# CHAIR metrics reported apart for captions of bias-probe images and of the others.
PROBE_SPLIT_METRICS = {key: CHAIR_METRICS[key] for key in
                       ("recall", "chair_i", "correct_per_caption", "hallucinated_per_caption")}


def _pope_splits(records: list[dict[str, Any]]) -> list[str]:
    found = {r["split"] for r in records}
    return [s for s in SPLIT_ORDER if s in found] + sorted(found - set(SPLIT_ORDER))


def metric_groups(pope_records: list[dict[str, Any]], caption_records: list[dict[str, Any]],
                  pairs: list[tuple[str, str]]) -> dict[str, MetricGroup]:
    """Every metric family over its samples, keyed ``pope/<split>``, ``pope/<split>/stratum/<label>`` (the
    "yes" rate of one kind of question: TP rate for ``present``, FP rate for the absent strata), ``pope/all``,
    ``chair`` (non-partner counts leave out the bias partners), ``chair/probe`` and ``chair/plain`` (captions
    of images that show a trigger without its partner, and the rest), ``cooccur``, ``pope_bias`` (pooled and
    stratum-matched rates) and ``pope_bias/stratum/<label>`` (the rates within one stratum); samples are
    sorted by id so two runs on the same files line up row by row."""
    groups: dict[str, MetricGroup] = {}

    def add(name: str, recs: list[dict[str, Any]], columns_fn: Any, metrics: dict[str, MetricFn]) -> None:
        if recs:
            recs = sorted(recs, key=lambda r: r["id"])
            groups[name] = MetricGroup([r["id"] for r in recs], columns_fn(recs), metrics)

    def pope_cols(recs: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        return pope_columns([r["parsed"] for r in recs], [r["truth"] for r in recs],
                            [r.get("unclear", False) for r in recs])

    for split in _pope_splits(pope_records):
        in_split = [r for r in pope_records if r["split"] == split]
        add(f"pope/{split}", in_split, pope_cols, POPE_METRICS)
        for label in sorted({r["stratum"] for r in in_split if r.get("stratum")}):
            add(f"pope/{split}/stratum/{label}", [r for r in in_split if r.get("stratum") == label], pope_cols,
                YES_RATE_METRICS)
    add("pope/all", pope_records, pope_cols, POPE_METRICS)
    partners = frozenset(p for _, p in pairs)
    add("chair", caption_records, lambda recs: chair_columns(recs, partners), CHAIR_METRICS)
    if pairs:
        add("cooccur", [r for r in caption_records if r["units"]], cooccur_columns, COOCCUR_METRICS)
        # Coverage where the prior competes with the image (a trigger shown, its partner absent) and where it
        # does not: a partner named in place of a shown object costs recall in the first group only.
        for name, probe in (("probe", True), ("plain", False)):
            add(f"chair/{name}", [r for r in caption_records if bool(r["units"]) == probe],
                lambda recs: chair_columns(recs, partners), PROBE_SPLIT_METRICS)
        bias_records = pope_bias_records(pope_records, pairs)
        strata = pope_bias_strata(bias_records)
        add("pope_bias", bias_records, lambda recs: pope_bias_strata_columns(recs, strata),
            pope_bias_metrics(len(strata)))
        for label in strata:
            if label is not None:  # without strata the one stratum is the pooled group above
                add(f"pope_bias/stratum/{label}", [r for r in bias_records if r["stratum"] == label],
                    pope_bias_columns, POPE_BIAS_METRICS)
    return groups


def _load_model(cfg: EvalConfig) -> tuple[Any, Any]:
    from accelerate import Accelerator

    from mmalign.models.loading import load_vlm

    if not cfg.model:
        raise ValueError("model is required (a local model dir) unless a model is passed in-process")
    return load_vlm(cfg.model, dtype=cfg.dtype, device=Accelerator().device)


def evaluate(cfg: EvalConfig, model: Any = None, processor: Any = None) -> dict[str, Any]:
    """Score ``model`` (loaded from ``cfg.model`` when not given) and write metrics + per-sample records.

    An in-process model is scored in eval mode and left in the train/eval mode it came in.
    Returns the content of ``metrics.json``.
    """
    if not cfg.lab_dir:
        raise ValueError("lab_dir is required: the folder the evaluation files and images live in")
    if (model is None) != (processor is None):
        raise ValueError("pass both model and processor, or neither (then cfg.model is loaded)")
    inputs = load_inputs(cfg)  # bad files fail here, before a model is loaded or run
    pairs = inputs.pairs
    if model is None:
        model, processor = _load_model(cfg)
    # Score in eval mode (no dropout) and hand a model being trained back in the mode it came in.
    was_training = model.training
    model.eval()
    try:
        pope_records = run_pope(model, processor, cfg, inputs) if inputs.pope_items else []
        caption_records = run_captions(model, processor, cfg, inputs) if inputs.caption_items else []
    finally:
        model.train(was_training)
    metrics = {}
    for name, group in metric_groups(pope_records, caption_records, pairs).items():
        values = bootstrap(group.columns, group.metrics, n_boot=cfg.stats.n_boot, seed=cfg.stats.seed,
                           level=cfg.stats.level)
        metrics |= {f"{name}/{key}": value.to_json() for key, value in values.items()}
    out = Path(cfg.out_dir)
    save_config(cfg, out)
    write_jsonl(out / POPE_SAMPLES, pope_records)
    write_jsonl(out / CAPTION_SAMPLES, caption_records)
    result = {"model": cfg.model or type(model).__name__, "config_hash": config_hash(cfg),
              "pope_scorer": cfg.pope.scorer, "bias_pairs": [list(p) for p in pairs],
              "stats": {"n_boot": cfg.stats.n_boot, "level": cfg.stats.level, "seed": cfg.stats.seed},
              "metrics": metrics}
    (out / METRICS_FILE).write_text(json.dumps(result, indent=1) + "\n")
    trackers = Trackers(cfg.report_to, out, to_dict(cfg))
    trackers.log({key: m["value"] for key, m in metrics.items() if m["value"] is not None}, step=0)
    trackers.close()
    logger.info("wrote %d metrics to %s", len(metrics), out / METRICS_FILE)
    return result


@dataclass(frozen=True)
class Comparison:
    """Runs side by side: ``names`` (the first is the baseline), each run's metrics from its
    ``metrics.json`` (``values[run][key]``), and paired tests of every other run against the baseline
    (``tests[run][key]``: difference run - baseline on the same samples, from ``n_boot`` replicates)."""

    names: list[str]
    values: dict[str, dict[str, MetricValue]]
    tests: dict[str, dict[str, PairedResult]]
    n_boot: int = 1000


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """``metrics.json`` content and the POPE and caption per-sample records of an evaluation dir."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an evaluation dir: {METRICS_FILE} is missing")
    result = json.loads(path.read_text())
    samples = []
    for name in (POPE_SAMPLES, CAPTION_SAMPLES):
        samples.append([json.loads(text) for _, text in read_jsonl_lines(run_dir / name)])
    return result, samples[0], samples[1]


def _value(entry: dict[str, Any]) -> MetricValue:
    nan = float("nan")
    return MetricValue(*(nan if entry[k] is None else entry[k] for k in ("value", "n", "ci_low", "ci_high")))


def compare(runs: dict[str, str | Path], *, n_boot: int = 1000, seed: int = 0,
            level: float = 0.95) -> Comparison:
    """Side-by-side metrics of evaluation dirs and paired bootstrap tests against the first run.

    The runs must have scored the same samples (same ids per metric group), which holds for evaluations
    of the same files; anything else is refused, naming the group.
    """
    if len(runs) < 1:
        raise ValueError("compare needs at least one evaluation dir")
    loaded = {name: load_run(path) for name, path in runs.items()}
    groups = {name: metric_groups(pope, caps, [tuple(p) for p in result["bias_pairs"]])
              for name, (result, pope, caps) in loaded.items()}
    names = list(runs)
    base = names[0]
    tests: dict[str, dict[str, PairedResult]] = {}
    for name in names[1:]:
        tests[name] = {}
        for group_name, base_group in groups[base].items():
            other = groups[name].get(group_name)
            if other is None or other.ids != base_group.ids or set(other.columns) != set(base_group.columns):
                raise ValueError(f"runs {base!r} and {name!r} were not scored on the same samples or POPE strata "
                                 f"(metric group {group_name!r}); compare evaluations of the same files")
            results = paired_bootstrap(other.columns, base_group.columns, base_group.metrics, n_boot=n_boot,
                                       seed=seed, level=level)
            tests[name] |= {f"{group_name}/{key}": res for key, res in results.items()}
    values = {name: {key: _value(entry) for key, entry in result["metrics"].items()}
              for name, (result, _, _) in loaded.items()}
    return Comparison(names, values, tests, n_boot)

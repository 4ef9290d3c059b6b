"""The papers' benchmarks on one model, from their official files: ``mmalign eval bench benchmark=...``.

``run_benchmark(cfg)`` loads a model from a local path (or takes one in-process), answers the benchmark's
questions greedily, scores the answers (parsing for POPE, the COCO matcher for CHAIR / Object HalBench, an LLM
judge for MMHal-Bench / MMHal-V / LLaVA-Bench) and writes into ``cfg.out_dir``: ``config.yaml``,
``samples.jsonl`` (one record per question: prompt, answer, parsed answer or judge reply and score) and
``metrics.json`` (every metric as ``{"value", "n", "ci_low", "ci_high"}``, bootstrap over questions, under
``<group>/<metric>``: POPE per split and ``all``; CHAIR overall; MMHal overall and per question type;
LLaVA-Bench overall and per category).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mmalign.config import ConfigError, config_hash, save_config
from mmalign.data.images import open_image, read_image_bytes
from mmalign.data.io import write_jsonl
from mmalign.evaluation import coco, llava_bench, mmhal
from mmalign.evaluation.judges import JudgeConfig, ask_judge
from mmalign.evaluation.pope import POPE_METRICS, pope_columns
from mmalign.evaluation.scoring import score_pope_generate, score_pope_likelihood
from mmalign.evaluation.stats import MetricFn, bootstrap

# A metric group: its per-question records, the function giving their columns, and the metrics over them.
Group = tuple[list[dict[str, Any]], Any, dict[str, MetricFn]]
from mmalign.evaluation.suite import StatsConfig
from mmalign.sampling.generate import GenerationParams, generate

logger = logging.getLogger(__name__)

# LLaVA-1.5's and lmms-eval's short-answer instruction after each POPE question.
POPE_SUFFIX = "\nAnswer the question using a single word or phrase."


@dataclass
class PopeBenchConfig:
    """Official ``coco_pope_<split>.json`` files and the COCO image folder; ``scorer``: "generate" (greedy answer,
    LLaVA's parsing: the papers' protocol) or "likelihood" (the likelier of ``candidates``)."""

    files: list[str] = field(default_factory=list)  # coco_pope_<split>.json files (the split is read from the name)
    images: str = ""  # folder of the COCO images the files name (val2014)
    scorer: Literal["generate", "likelihood"] = "generate"  # greedy answer + parsing, or the likelier candidate
    suffix: str = POPE_SUFFIX  # text appended to each question
    candidates: list[str] = field(default_factory=lambda: ["Yes", "No"])  # answers compared by the likelihood scorer
    max_new_tokens: int = 128  # answer budget of the generate scorer (lmms-eval: 128)


@dataclass
class ChairBenchConfig:
    """CHAIR on COCO: ``questions`` = Object HalBench's ``obj_halbench_300_with_image.jsonl`` (images inside), or
    "" to caption ``n_images`` images drawn (``seed``) from the instances file, found in ``images``, with
    ``prompt``. ``instances`` / ``captions``: COCO annotation files; ``synonyms``: the reference synonyms file."""

    questions: str = ""  # Object HalBench jsonl (images inside); "" = sample COCO images instead
    images: str = ""  # COCO image folder (when sampling images)
    n_images: int = 500  # images sampled from the instances file (when questions is "")
    prompt: str = "Please describe this image in detail."  # prompt for sampled images
    instances: str = ""  # COCO instances_*.json (ground-truth categories, image file names)
    captions: str = ""  # COCO captions_*.json (objects named in the captions join the ground truth)
    synonyms: str = ""  # the reference synonyms file: one line per class, class name first
    max_new_tokens: int = 512  # answer budget


@dataclass
class MMHalBenchConfig:
    """``questions``: ``response_template.json``; ``images``: its image folder; ``template``: a judge prompt file
    with ``{image_content}``, ``{question}``, ``{gt_answer}``, ``{answer}`` ("" = the shipped one; the official
    prompt gives scores comparable with published ones)."""

    questions: str = ""  # response_template.json
    images: str = ""  # folder of the images (file name = the end of image_src)
    template: str = ""  # judge prompt file ("" = the shipped one)
    max_new_tokens: int = 512  # answer budget


@dataclass
class LlavaBenchConfig:
    """``folder``: questions.jsonl, context.jsonl, answers_gpt4.jsonl; ``images`` (default ``<folder>/images``);
    ``rules``: a ``rule.json`` ("" = the shipped one)."""

    folder: str = ""  # holds questions.jsonl, context.jsonl, answers_gpt4.jsonl
    images: str = ""  # image folder ("" = <folder>/images)
    rules: str = ""  # rule.json for the judge ("" = the shipped one)
    max_new_tokens: int = 512  # answer budget


@dataclass
class BenchConfig:
    """One benchmark on one model (``model``: local folder loaded in ``dtype``, unused when passed in-process)."""

    benchmark: Literal["pope", "chair", "mmhal", "mmhal_v", "llava_bench"] = "pope"  # which benchmark to run
    model: str = ""  # local model folder
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # dtype the model is loaded in
    out_dir: str = "runs/bench"  # where config, samples and metrics are written
    seed: int = 0  # generation seed (answers are greedy) and image sampling of chair
    batch_size: int = 16  # questions per generate call
    pope: PopeBenchConfig = field(default_factory=PopeBenchConfig)  # POPE files and scorer
    chair: ChairBenchConfig = field(default_factory=ChairBenchConfig)  # CHAIR / Object HalBench files
    mmhal: MMHalBenchConfig = field(default_factory=MMHalBenchConfig)  # MMHal-Bench files
    llava_bench: LlavaBenchConfig = field(default_factory=LlavaBenchConfig)  # LLaVA-Bench-in-the-Wild files
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # the LLM judge (mmhal, mmhal_v, llava_bench)
    stats: StatsConfig = field(default_factory=StatsConfig)  # bootstrap settings

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def check_files(cfg: BenchConfig) -> None:
    """The file settings ``cfg.benchmark`` needs are set; a ConfigError names the missing keys."""
    needed = {"pope": {"pope.files": cfg.pope.files, "pope.images": cfg.pope.images},
              "chair": {"chair.instances": cfg.chair.instances, "chair.captions": cfg.chair.captions,
                        "chair.synonyms": cfg.chair.synonyms},
              "mmhal": {"mmhal.questions": cfg.mmhal.questions, "mmhal.images": cfg.mmhal.images},
              "mmhal_v": {"mmhal.questions": cfg.mmhal.questions, "mmhal.images": cfg.mmhal.images},
              "llava_bench": {"llava_bench.folder": cfg.llava_bench.folder}}[cfg.benchmark]
    missing = [key for key, value in needed.items() if not value]
    if cfg.benchmark == "chair" and not cfg.chair.questions and not cfg.chair.images:
        missing.append("chair.images (or chair.questions)")
    if missing:
        raise ConfigError(f"benchmark {cfg.benchmark} needs {', '.join(missing)}")


def _answers(model: Any, processor: Any, items: list[dict[str, Any]], images: list[Any], max_new_tokens: int,
             cfg: BenchConfig) -> list[str]:
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate(model, processor, [it["prompt"] for it in items], [[im] for im in images], params,
                    seed=cfg.seed, batch_size=cfg.batch_size)


def _open(items: list[dict[str, Any]], root: str) -> list[Any]:
    """Each item's image (a file under ``root`` or embedded bytes), each distinct file opened once."""
    cache: dict[str, Any] = {}
    out = []
    for item in items:
        ref = item["image"]
        if isinstance(ref, str) and ref not in cache:
            cache[ref] = open_image(ref, root)
        out.append(cache[ref] if isinstance(ref, str) else open_image(ref, root))
    return out


def _pope(model: Any, processor: Any, cfg: BenchConfig) -> tuple[list[dict], dict[str, Group]]:
    items = coco.load_pope_files(cfg.pope.files, cfg.pope.suffix)
    images = _open(items, cfg.pope.images)
    if cfg.pope.scorer == "generate":
        records = score_pope_generate(model, processor, items, images, max_new_tokens=cfg.pope.max_new_tokens,
                                      batch_size=cfg.batch_size, seed=cfg.seed)
    else:
        records = score_pope_likelihood(model, processor, items, images, candidates=cfg.pope.candidates,
                                        batch_size=cfg.batch_size)

    def cols(recs: list[dict]) -> dict[str, np.ndarray]:
        return pope_columns([r["parsed"] for r in recs], [r["truth"] for r in recs])

    groups = {f"pope/{s}": ([r for r in records if r["split"] == s], cols, POPE_METRICS)
              for s in dict.fromkeys(r["split"] for r in records)}
    return records, groups | {"pope/all": (records, cols, POPE_METRICS)}


def _chair_items(cfg: ChairBenchConfig, seed: int) -> tuple[list[dict[str, Any]], str]:
    if cfg.questions:
        return coco.load_object_halbench(cfg.questions), ""
    names = coco.coco_file_names(cfg.instances)
    chosen = np.random.default_rng(seed).permutation(sorted(names))[: cfg.n_images]
    items = [{"id": str(i), "image_id": int(i), "prompt": cfg.prompt, "image": names[int(i)]} for i in chosen]
    return items, cfg.images


def _chair(model: Any, processor: Any, cfg: BenchConfig) -> tuple[list[dict], dict[str, Group]]:
    vocab = coco.load_coco_synonyms(cfg.chair.synonyms)
    items, root = _chair_items(cfg.chair, cfg.seed)
    truth = coco.coco_truth(cfg.chair.instances, cfg.chair.captions, vocab, [it["image_id"] for it in items])
    answers = _answers(model, processor, items, _open(items, root), cfg.chair.max_new_tokens, cfg)
    records = [{**coco.chair_sample(it["id"], ans, truth[it["image_id"]], vocab), "image_id": it["image_id"],
                "prompt": it["prompt"]} for it, ans in zip(items, answers)]
    return records, {"chair": (records, coco.coco_chair_columns, coco.COCO_CHAIR_METRICS)}


def _mmhal(model: Any, processor: Any, cfg: BenchConfig) -> tuple[list[dict], dict[str, Group]]:
    items = mmhal.load_mmhal(cfg.mmhal.questions)
    answers = _answers(model, processor, items, _open(items, cfg.mmhal.images), cfg.mmhal.max_new_tokens, cfg)
    template = Path(cfg.mmhal.template or mmhal.DEFAULT_TEMPLATE).read_text(encoding="utf-8")
    with_image = cfg.benchmark == "mmhal_v"
    requests = [mmhal.judge_request(it, ans, template, read_image_bytes(it["image"], cfg.mmhal.images)
                                    if with_image else None) for it, ans in zip(items, answers)]
    replies = ask_judge(requests, cfg.judge, str(Path(cfg.out_dir) / "judge_cache"))
    records = [mmhal.mmhal_record(it, ans, rep) for it, ans, rep in zip(items, answers, replies)]
    groups = {cfg.benchmark: (records, mmhal.mmhal_columns, mmhal.MMHAL_METRICS)}
    for kind in dict.fromkeys(r["type"] for r in records):
        groups[f"{cfg.benchmark}/type/{kind}"] = ([r for r in records if r["type"] == kind], mmhal.mmhal_columns,
                                                  mmhal.MMHAL_METRICS)
    return records, groups


def _llava_bench(model: Any, processor: Any, cfg: BenchConfig) -> tuple[list[dict], dict[str, Group]]:
    lb = cfg.llava_bench
    items = llava_bench.load_llava_bench(lb.folder)
    answers = _answers(model, processor, items, _open(items, lb.images or str(Path(lb.folder) / "images")),
                       lb.max_new_tokens, cfg)
    rules = llava_bench.load_rules(lb.rules or llava_bench.DEFAULT_RULES)
    requests = [llava_bench.judge_request(it, ans, rules) for it, ans in zip(items, answers)]
    replies = ask_judge(requests, cfg.judge, str(Path(cfg.out_dir) / "judge_cache"))
    records = [llava_bench.llava_bench_record(it, ans, rep) for it, ans, rep in zip(items, answers, replies)]
    metrics, columns = llava_bench.LLAVA_BENCH_METRICS, llava_bench.llava_bench_columns
    groups = {"llava_bench/all": (records, columns, metrics)}
    for category in dict.fromkeys(r["category"] for r in records):
        groups[f"llava_bench/{category}"] = ([r for r in records if r["category"] == category], columns, metrics)
    return records, groups


_RUNNERS = {"pope": _pope, "chair": _chair, "mmhal": _mmhal, "mmhal_v": _mmhal, "llava_bench": _llava_bench}


def run_benchmark(cfg: BenchConfig, model: Any = None, processor: Any = None) -> dict[str, Any]:
    """Answer and score ``cfg.benchmark`` with ``model`` (loaded from ``cfg.model`` when not given); writes the
    config, per-question samples and metrics to ``cfg.out_dir`` and returns the content of ``metrics.json``."""
    if (model is None) != (processor is None):
        raise ValueError("pass both model and processor, or neither (then cfg.model is loaded)")
    check_files(cfg)
    if model is None:
        from accelerate import Accelerator

        from mmalign.models.loading import load_vlm

        if not cfg.model:
            raise ValueError("model is required (a local model dir) unless a model is passed in-process")
        model, processor = load_vlm(cfg.model, dtype=cfg.dtype, device=Accelerator().device)
    out = Path(cfg.out_dir)
    save_config(cfg, out)
    was_training = model.training
    model.eval()
    try:
        records, groups = _RUNNERS[cfg.benchmark](model, processor, cfg)
    finally:
        model.train(was_training)
    metrics: dict[str, Any] = {}
    for name, (recs, columns, fns) in groups.items():
        values = bootstrap(columns(recs), fns, n_boot=cfg.stats.n_boot, seed=cfg.stats.seed,
                           level=cfg.stats.level)
        metrics |= {f"{name}/{key}": value.to_json() for key, value in values.items()}
    write_jsonl(out / "samples.jsonl", records)
    result = {"benchmark": cfg.benchmark, "model": cfg.model or type(model).__name__, "config_hash": config_hash(cfg),
              "judge": cfg.judge.endpoint.model or None,
              "stats": {"n_boot": cfg.stats.n_boot, "level": cfg.stats.level, "seed": cfg.stats.seed},
              "metrics": metrics}
    (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
    logger.info("%s: wrote %d metrics to %s", cfg.benchmark, len(metrics), out / "metrics.json")
    return result

"""BDHS speed: the batched sampler against the naive per-sentence loop, same records and seed, side by side.

    python benchmarks/bench_bdhs.py [--model DIR | --text-shape smollm2-135m] [--input FILE] [--records N]
                                    [--n-iter K] [--batch-size B]

Each mode runs in its own fresh subprocess (so peak RSS is its own) and writes its answers; the parent
prints sentences/s, wall time, peak RSS and whether the two modes produced identical answers. Without
``--model`` a random tiny LLaVA (``build_tiny_vlm("llava")``) is used, or with ``--text-shape smollm2-135m``
the same LLaVA wiring with a randomly initialised text model of SmolLM2-135M's shape (the language model of
SmolVLM-256M; the tiny vision tower and tokenizer are kept, which favours the naive mode: it pays the image
encoder once per sentence); without ``--input`` (a record file, e.g.
the lab's ``pref_prompts.jsonl``) records are synthetic multi-sentence captions over random images. The naive
mode is Algorithm 1 as written: one ``generate_masked`` call per sentence, with the same per-record random draws.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import LlavaForConditionalGeneration

from mmalign.data.images import open_image
from mmalign.data.record_files import read_records
from mmalign.data.schema import PreferenceRecord
from mmalign.models.loading import load_vlm
from mmalign.models.tiny import build_tiny_vlm
from mmalign.sampling.bdhs import (
    BDHSConfig, BDHSResult, assemble_answer, bdhs_sample, generation_rows, is_unguided, iteration_images,
)
from mmalign.sampling.guidance import plan_iteration, record_rng
from mmalign.sampling.masked import generate_masked, image_token_counts
from mmalign.sampling.similarity import SentenceSimilarity

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star", "cross"]
# SmolLM2-135M's decoder (HuggingFaceTB/SmolLM2-135M config.json), the text model of SmolVLM-256M.
SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3)


def synthetic(n: int) -> tuple[list[PreferenceRecord], list[list[Image.Image]]]:
    rng = np.random.default_rng(0)
    records, images = [], []
    for i in range(n):
        objs = [f"{rng.choice(COLOURS)} {rng.choice(SHAPES)}" for _ in range(3)]
        chosen = f"There is a {objs[0]} and a {objs[1]}. The {objs[0]} is on the left. Yes, there is a {objs[2]}."
        records.append(PreferenceRecord(f"bench-{i}", [f"{i}.png"], "<image>\nDescribe the image.", chosen, []))
        images.append([Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))])
    return records, images


def naive(model, processor, records, images, cfg, similarity) -> list[BDHSResult]:
    """Algorithm 1 one record and one sentence at a time (one generate call per sentence)."""
    results = []
    counts = image_token_counts(model, processor, [r.prompt for r in records], images)
    for record, imgs, n_tokens in zip(records, images, counts):
        for iteration in range(1, cfg.n_iter + 1):
            unguided = is_unguided(cfg, iteration)
            plan = plan_iteration(record_rng(cfg.seed, record.id, iteration), record.chosen, n_tokens, cfg.rho,
                                  not unguided, cfg.swap_p)
            texts = []
            for row in generation_rows(record, iteration_images(imgs, plan, cfg), plan):
                texts += generate_masked(model, processor, [row], temperature=cfg.temperature,
                                         stop_at_sentence_end=not unguided,
                                         max_new_tokens=cfg.max_answer_tokens if unguided else cfg.max_sentence_tokens)
            answer = assemble_answer(plan, texts)
            phi = float(similarity([answer], [record.chosen])[0])
            if phi < cfg.similarity_threshold or iteration == cfg.n_iter:
                results.append(BDHSResult(record.id, answer, iteration, phi, unguided))
                break
    return results


def rows_generated(model, processor, records, images, results, cfg) -> int:
    """Generation rows (sentences, or unguided answers) over all iterations each record went through."""
    counts = image_token_counts(model, processor, [r.prompt for r in records], images)
    total = 0
    for record, n_tokens, result in zip(records, counts, results):
        for iteration in range(1, result.iteration + 1):
            plan = plan_iteration(record_rng(cfg.seed, record.id, iteration), record.chosen, n_tokens, cfg.rho,
                                  not is_unguided(cfg, iteration), cfg.swap_p)
            total += len(generation_rows(record, [], plan))
    return total


class TimedSimilarity:
    """The real filter, with the seconds spent in it counted (the same work in both modes)."""

    def __init__(self):
        self.similarity, self.seconds = SentenceSimilarity("", "cpu"), 0.0

    def __call__(self, texts, references):
        start = time.perf_counter()
        out = self.similarity(texts, references)
        self.seconds += time.perf_counter() - start
        return out


def policy(args: argparse.Namespace):
    """The model to sample from: a local folder, the tiny LLaVA, or the tiny LLaVA with a SmolLM2-135M decoder."""
    if args.model:
        return load_vlm(args.model)
    model, processor = build_tiny_vlm("llava")
    if args.text_shape == "tiny":
        return model, processor
    config = copy.deepcopy(model.config)
    for key, value in SMOLLM2_135M.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    sized = LlavaForConditionalGeneration(config).eval()
    sized.generation_config = model.generation_config
    return sized, processor


def run_mode(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, processor = policy(args)
    if args.input:
        records = read_records(args.input)[: args.records]
        images = [[open_image(ref, Path(args.input).parent) for ref in r.images] for r in records]
    else:
        records, images = synthetic(args.records)
    cfg = BDHSConfig(n_iter=args.n_iter, batch_size=args.batch_size, max_sentence_tokens=24, max_answer_tokens=48)
    similarity = TimedSimilarity()
    start = time.perf_counter()
    if args.mode == "naive":
        results = naive(model, processor, records, images, cfg, similarity)
    else:
        results = []
        for i in range(0, len(records), cfg.batch_size):
            results += bdhs_sample(model, processor, records[i:i + cfg.batch_size], images[i:i + cfg.batch_size],
                                   cfg, similarity)
    seconds = time.perf_counter() - start
    sentences = rows_generated(model, processor, records, images, results, cfg)
    out = {"mode": args.mode, "seconds": seconds, "records": len(records), "sentences": sentences,
           "filter_seconds": similarity.seconds, "embedded": len(similarity.similarity.cache),
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "answers": [(r.id, r.answer, r.iteration, r.similarity) for r in results]}
    Path(args.out).write_text(json.dumps(out))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="local VLM folder (default: random tiny LLaVA)")
    parser.add_argument("--text-shape", choices=["tiny", "smollm2-135m"], default="tiny",
                        help="decoder size of the random LLaVA used without --model")
    parser.add_argument("--input", help="record file to sample (default: synthetic captions)")
    parser.add_argument("--records", type=int, default=32)
    parser.add_argument("--n-iter", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mode", choices=["naive", "batched"])
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.mode:
        run_mode(args)
        return
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("naive", "batched"):
            out = Path(tmp) / f"{mode}.json"
            cmd = [sys.executable, __file__, "--mode", mode, "--out", str(out), "--records", str(args.records),
                   "--n-iter", str(args.n_iter), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
                   "--text-shape", args.text_shape]
            cmd += (["--model", args.model] if args.model else []) + (["--input", args.input] if args.input else [])
            subprocess.run(cmd, check=True)
            report[mode] = json.loads(out.read_text())
    same = report["naive"]["answers"] == report["batched"]["answers"]
    for mode, r in report.items():
        gen = r["seconds"] - r["filter_seconds"]
        print(f"{mode:8s} total {r['seconds']:7.2f} s ({r['sentences'] / r['seconds']:6.1f} sentences/s); "
              f"generation {gen:7.2f} s ({r['sentences'] / gen:6.1f} sentences/s); similarity filter "
              f"{r['filter_seconds']:6.2f} s ({r['embedded']} texts embedded, "
              f"{1e3 * r['filter_seconds'] / r['embedded']:.1f} ms each); {r['sentences']} sentences; "
              f"peak RSS {r['peak_rss_mb']:5.0f} MB")
    generation = [r["seconds"] - r["filter_seconds"] for r in (report["naive"], report["batched"])]
    print(f"generation speed-up {generation[0] / generation[1]:.1f}x")
    print(f"total speed-up {report['naive']['seconds'] / report['batched']['seconds']:.1f}x; identical answers: {same}")
    # Both modes embed the same texts one by one, so even free batched generation could not beat this.
    ceiling = report["naive"]["seconds"] / report["batched"]["filter_seconds"]
    print(f"end-to-end ceiling with this filter: {ceiling:.1f}x")


if __name__ == "__main__":
    main()

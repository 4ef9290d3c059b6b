"""Reward-model train-step throughput: mmalign shared-prefix layouts vs a plain per-answer forward, side by side;
and whether TRL 1.16's RewardTrainer can take the same model at all.

One run builds the LLaVA-architecture model of ``bench_dpo.py`` (CLIP tower at 14-px patches, Llama text model,
random init, local tokenizer) with a LoRA adapter and a scalar head (``ScalarHeadModel``), and the same VLM-shaped
pairs (K rejected answers per record) for every variant, then runs each variant in its own subprocess, interleaved
over ``--rounds``. A timed step is the whole update: forward of every answer of the batch, Bradley-Terry loss
(Apple Eq. 1, mean over pairs), backward, optimizer step; batches are collated before timing.

Variants (``mmalign.models.reward_forward``): ``plain`` (one row per answer: image + prompt encoded again for
every answer), ``shared`` (one packed row per record, block mask), ``cache`` (prompt KV cache, answers against it:
what ``mmalign train rm`` runs on this model by default). ``--trl`` tries to build TRL's ``RewardTrainer`` on the
same VLM and reports the exact error it raises.

    python benchmarks/bench_rm.py --k 1 --out /tmp/bench_rm_k1.json
    python benchmarks/bench_rm.py --k 4 --out /tmp/bench_rm_k4.json
    python benchmarks/bench_rm.py --trl
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench_dpo import (  # noqa: E402
    _autocast, _lora, _peak_reset, _rss_mib, _side, add_shape_args, bench_main, build_model,
    interleaved_runs, make_pairs,
)

logger = logging.getLogger("bench_rm")
VARIANTS = {"plain": "plain", "shared": "shared_prefix", "cache": "prefix_cache"}


def _setup(args) -> tuple[Any, Any, list[dict[str, Any]]]:
    from peft import get_peft_model

    from mmalign.models.heads import ScalarHeadModel
    from mmalign.models.reward_forward import reward_batch

    model, processor = build_model(args.image_tokens, args.hidden, args.layers)
    rm = ScalarHeadModel(get_peft_model(model, _lora())).to(args.device).train()
    records, images = make_pairs(args.batch * (args.steps + 1), args.images, _side(args), args.k)
    batches = [{k: v.to(args.device) for k, v in reward_batch(VARIANTS[args.variant], processor,
                                                              records[s: s + args.batch],
                                                              images[s: s + args.batch], None).items()}
               for s in range(0, len(records), args.batch)]
    optimizer = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-5)
    return rm, optimizer, batches


def _step(args, rm, optimizer, batch) -> None:
    from mmalign.models.reward_forward import REWARD_LAYOUTS
    from mmalign.objectives.reward import bradley_terry

    with _autocast(args):
        out = REWARD_LAYOUTS[VARIANTS[args.variant]][1](rm, batch)
        loss = bradley_terry(out.rewards[:, 0], out.rewards[:, 1:]).losses.mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_variant(args) -> dict[str, Any]:
    """Time ``args.steps`` steps after one warm-up step; peak RSS."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rm, optimizer, batches = _setup(args)
    cuda = args.device.startswith("cuda")
    _step(args, rm, optimizer, batches[args.steps])  # warm-up on the spare batch
    _peak_reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    for i in range(args.steps):
        start = time.perf_counter()
        _step(args, rm, optimizer, batches[i])
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    pairs = args.batch * args.k
    return {"variant": args.variant, "pairs_per_s": pairs * args.steps / sum(seconds),
            "pairs_per_s_best_step": pairs / min(seconds), "peak_rss_mib": _rss_mib("VmHWM"),
            "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}


def compare(args, variants: list[str]) -> dict[str, Any]:
    """Every variant ``args.rounds`` times, interleaved; median pairs/s per variant and ratios to ``plain``."""
    def command(variant: str) -> list[str]:
        return [sys.executable, __file__, "--variant", variant, *(
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("image_tokens", "images", "k", "batch", "steps", "hidden", "layers", "threads", "device",
                     "dtype"))]

    runs = interleaved_runs(args.rounds, variants, command, "pairs_per_s")
    summary = {v: {"pairs_per_s": statistics.median(x["pairs_per_s"] for x in rs),
                   "pairs_per_s_runs": [x["pairs_per_s"] for x in rs],
                   "pairs_per_s_best_step": max(x["pairs_per_s_best_step"] for x in rs),
                   "peak_rss_mib": statistics.median(x["peak_rss_mib"] for x in rs),
                   "cuda_peak_mib": rs[0]["cuda_peak_mib"]} for v, rs in runs.items()}
    for s in summary.values():
        s["speed_vs_plain"] = s["pairs_per_s"] / summary["plain"]["pairs_per_s"]
        s["best_step_vs_plain"] = s["pairs_per_s_best_step"] / summary["plain"]["pairs_per_s_best_step"]
    return {"config": {k: v for k, v in vars(args).items() if k not in ("variant", "out", "trl")},
            "results": summary}


def markdown(report: dict[str, Any]) -> str:
    rows = ["| variant | pairs/s (median) | x plain | best step pairs/s | x plain | peak RSS MiB |", "|---" * 6 + "|"]
    for name, s in report["results"].items():
        rows.append(f"| {name} | {s['pairs_per_s']:.2f} | {s['speed_vs_plain']:.2f} | "
                    f"{s['pairs_per_s_best_step']:.2f} | {s['best_step_vs_plain']:.2f} | {s['peak_rss_mib']:.0f} |")
    return "\n".join(rows)


def trl_attempts(args) -> dict[str, str]:
    """Build TRL's RewardTrainer on the benchmark's VLM three ways; the error each raises (or "ok")."""
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    model, processor = build_model(args.image_tokens, args.hidden, args.layers)
    tmp = tempfile.TemporaryDirectory(prefix="bench_rm_trl_")
    folder = Path(tmp.name) / "vlm"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    records, images = make_pairs(4, args.images, _side(args), 1)
    data = Dataset.from_dict({"images": images, "prompt": [r.prompt for r in records],
                              "chosen": [r.chosen for r in records], "rejected": [r.rejected[0] for r in records]})
    config = RewardConfig(output_dir=str(Path(tmp.name) / "out"), report_to="none", use_cpu=True)
    outcome = {}
    for name, candidate in (("model folder (str)", str(folder)), ("model instance", model)):
        try:
            RewardTrainer(model=candidate, args=config, train_dataset=data, processing_class=processor.tokenizer)
            outcome[name] = "ok"
        except Exception as err:  # what a user of TRL hits: the message is the result
            outcome[name] = f"{type(err).__name__}: {err}"
    model.config.num_labels = 1
    try:
        trainer = RewardTrainer(model=model, args=config, train_dataset=data, processing_class=processor.tokenizer)
        batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
        outcome["instance with num_labels=1: batch keys"] = ", ".join(sorted(batch))
        loss = trainer.compute_loss(trainer.model, dict(batch))
        with torch.no_grad():
            logits = trainer.model(**batch).logits
        outcome["instance with num_labels=1: compute_loss"] = (
            f"runs (loss {float(loss):.4f}) on outputs.logits of shape {list(logits.shape)}: LM logits over the "
            f"vocabulary at every position, not one reward per sequence; no image tensor reaches the model")
    except Exception as err:
        outcome["instance with num_labels=1"] = f"{type(err).__name__}: {err}"
    tmp.cleanup()
    return outcome


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=list(VARIANTS), help="run one variant in this process (internal)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--trl", action="store_true", help="only try TRL's RewardTrainer on the VLM")
    add_shape_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    def report(args: argparse.Namespace) -> dict[str, Any]:
        if args.trl:
            return {"trl": trl_attempts(args)}
        return compare(args, args.variants.split(","))

    bench_main(argv, parse_args, run_variant, report, markdown)


if __name__ == "__main__":
    main()

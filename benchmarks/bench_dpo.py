"""DPO train-step throughput and memory: mmalign shared-prefix vs mmalign plain vs TRL's DPOTrainer, side by side.

One run builds the same LLaVA-architecture model (CLIP tower at 14-px patches, Llama text model, random init,
local tokenizer) and the same VLM-shaped pairs for every variant, then runs each variant in its own subprocess
(so peak RSS is per variant), interleaved over ``--rounds`` so that load from other users of the machine hits
all variants alike. A timed step is the whole update: policy forward + backward, reference forward (LoRA
adapter disabled, as TRL does with a PEFT model), optimizer step. Batches are collated before timing, for
TRL by its own DataCollatorForVisionPreference through its own dataloader; TRL's step is its
``DPOTrainer.training_step`` followed by its optimizer's step.

Variants: ``trl``; ``plain`` (``collate_preference`` + ``preference_forward``); ``shared`` (packed rows with a
block mask: ``collate_shared_prefix`` + ``shared_prefix_forward``); ``shared_ckpt`` (+ activation
checkpointing); ``shared_cached_ref`` (reference log-probs computed once before training, as the offline
trainer's cache does); ``cache`` (prompt KV cache reused by the answers: ``collate_prefix_cache`` +
``prefix_cache_forward``; what the trainers' default ``forward: auto`` runs on this model).
FLOPs are counted once per variant with ``torch.utils.flop_counter`` (eager attention, so the attention score
matmuls are counted at their full [L, L] size); the *unique-token limit* is the same step over one causal row
per record holding each unique token once ([image + prompt | chosen | rejected]).

    python benchmarks/bench_dpo.py --out bench_dpo.json           # CPU, float32
    python benchmarks/bench_dpo.py --device cuda --dtype bf16     # GPU, bf16 autocast, CUDA memory too
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

logger = logging.getLogger("bench_dpo")
VARIANTS = ("trl", "plain", "shared", "shared_ckpt", "shared_cached_ref", "cache")
PATCH = 14
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
# ~32 prompt tokens and ~64 answer tokens with the tiny BPE tokenizer (checked by ``make_pairs``).
PROMPT = ("Describe the image in detail. What is shown in the picture? How many objects are there? "
          "What color is it?")
CHOSEN = "There is a red circle and a blue square. " * 6
REJECTED = "There is a green star and a red circle. " * 6


def build_model(image_tokens_per_image: int, hidden: int, layers: int, seed: int = 0) -> tuple[Any, Any]:
    """LLaVA-1.5 architecture: CLIP tower with (side/14)^2 image tokens per image, Llama text model."""
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    from mmalign.models.tiny import build_tokenizer

    grid = round(image_tokens_per_image ** 0.5)
    if grid * grid != image_tokens_per_image:
        raise ValueError(f"image tokens per image must be a square, got {image_tokens_per_image}")
    tok = build_tokenizer("llava")
    side = grid * PATCH
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=2, image_size=side, patch_size=PATCH,
                           projection_dim=64),
        text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                         num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64,
                         max_position_embeddings=16384, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_index=tok.convert_tokens_to_ids("<image>"), image_seq_length=image_tokens_per_image,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side}),
        tokenizer=tok, patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )
    return model, processor


def make_pairs(n: int, images_per_record: int, side: int, k_rejected: int, seed: int = 0):
    """n records with ``images_per_record`` random-noise images, the fixed prompt and answers of ~64 tokens."""
    import numpy as np
    from PIL import Image

    from mmalign.data.schema import PreferenceRecord

    rng = np.random.default_rng(seed)
    records, images = [], []
    for i in range(n):
        imgs = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(images_per_record)]
        prompt = "<image>\n" * images_per_record + f"{PROMPT} ({i})"
        rejected = [REJECTED.replace("green", ["green", "cyan", "pink", "gray"][j]) for j in range(k_rejected)]
        records.append(PreferenceRecord(f"r{i}", [f"{i}_{j}.png" for j in range(images_per_record)], prompt,
                                        CHOSEN, rejected))
        images.append(imgs)
    return records, images


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS)


def _peak_reset() -> None:
    """Reset the process's peak-RSS mark (VmHWM) so it covers the training steps only."""
    Path("/proc/self/clear_refs").write_text("5")


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


# --- the variants (each runs in its own process) -------------------------------------------------------------


def _mmalign_setup(args, variant):
    from peft import get_peft_model

    from mmalign.models.layouts import PREFERENCE_LAYOUTS

    model, processor = build_model(args.image_tokens, args.hidden, args.layers)
    policy = get_peft_model(model, _lora()).to(args.device)
    if variant == "shared_ckpt":
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        policy.enable_input_require_grads()
    layout = {"plain": "plain", "cache": "prefix_cache"}.get(variant, "shared_prefix")
    collate, forward = PREFERENCE_LAYOUTS[layout]
    records, images = make_pairs(args.batch * (args.steps + 1), args.images, _side(args), args.k)
    batches = [{k: v.to(args.device) for k, v in collate(processor, records[s: s + args.batch],
                                                         images[s: s + args.batch]).items()}
               for s in range(0, len(records), args.batch)]
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    cached = None
    if variant == "shared_cached_ref":
        with torch.no_grad(), policy.disable_adapter(), _autocast(args):
            cached = [forward(policy, b) for b in batches]
    return policy, optimizer, batches, forward, cached


def _autocast(args):
    return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bf16")


def _mmalign_step(args, policy, optimizer, batch, forward, ref=None) -> None:
    from mmalign.objectives.preference import PreferenceLogps, combine_rejected, dpo

    with _autocast(args):
        out = forward(policy, batch)
        if ref is None:
            with torch.no_grad(), policy.disable_adapter():
                ref = forward(policy, batch)
        logps = PreferenceLogps(out.chosen_logps, out.rejected_logps, ref.chosen_logps, ref.rejected_logps,
                                out.chosen_lengths, out.rejected_lengths)
        losses = dpo(logps, beta=0.1).losses
        weights = torch.ones(losses.shape[1], device=losses.device)
        loss = combine_rejected(losses, out.rejected_mask, weights).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _limit_step(args, policy, batch) -> None:
    """The unique-token limit: one causal row per record over the packed tokens, no block mask."""
    from mmalign.models.logprobs import answer_token_logps, sequence_logps

    plain_row = {k: v for k, v in batch.items() if k not in ("segment_ids", "order_ids")}
    with _autocast(args):
        logps = sequence_logps(*answer_token_logps(policy, plain_row))
        with torch.no_grad(), policy.disable_adapter():
            ref = sequence_logps(*answer_token_logps(policy, plain_row))
    (logps - ref).sum().backward()


def _trl_setup(args):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mmalign.data.chat import render_prompt

    if args.k != 1:
        raise ValueError("TRL's DPOTrainer takes one rejected answer per prompt; run it with --k 1")
    model, processor = build_model(args.image_tokens, args.hidden, args.layers)
    records, images = make_pairs(args.batch * (args.steps + 1), args.images, _side(args), args.k)
    eos = processor.tokenizer.eos_token  # mmalign's answer_ids appends EOS; give TRL the same answer tokens
    data = Dataset.from_dict({
        "images": images, "prompt": [render_prompt(processor, r.prompt, len(i)) for r, i in zip(records, images)],
        "chosen": [r.chosen + eos for r in records], "rejected": [r.rejected[0] + eos for r in records],
    })
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), per_device_train_batch_size=args.batch, max_length=None,
        beta=0.1, learning_rate=1e-5, report_to="none", use_cpu=args.device == "cpu", bf16=args.dtype == "bf16",
        dataloader_num_workers=0, seed=0, save_strategy="no", logging_strategy="no", remove_unused_columns=False,
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=processor,
                         peft_config=_lora())
    trainer.create_optimizer()
    loader = trainer.get_train_dataloader()
    batches = [b for _, b in zip(range(args.steps + 1), loader)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets for one batch per update
    return trainer, batches


def _trl_step(trainer, batch) -> None:
    trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def _base(model: Any) -> Any:
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def run_variant(args) -> dict[str, Any]:
    """Set up one variant, time ``args.steps`` steps after one warm-up step; peak memory; FLOPs of one step."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.variant == "trl":
        trainer, batches = _trl_setup(args)
        model = trainer.model

        def step(i: int) -> None:
            _trl_step(trainer, batches[i])
    else:
        model, optimizer, batches, forward, cached = _mmalign_setup(args, args.variant)

        def step(i: int) -> None:
            _mmalign_step(args, model, optimizer, batches[i], forward, None if cached is None else cached[i])
    cuda = args.device.startswith("cuda")
    rss_before = _rss_mib("VmRSS")
    step(args.steps)  # warm-up on the spare batch
    _peak_reset()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    step_seconds = []
    for i in range(args.steps):
        start = time.perf_counter()
        step(i)
        if cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
    seconds = sum(step_seconds)
    # best step, as timeit reports: on shared cores other jobs only ever add time
    best = args.batch * args.k / min(step_seconds)
    result = {"variant": args.variant, "seconds": seconds, "pairs_per_s": args.batch * args.k * args.steps / seconds,
              "pairs_per_s_best_step": best,
              "peak_rss_mib": _rss_mib("VmHWM"), "rss_before_steps_mib": rss_before,
              "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
    _base(model).set_attn_implementation("eager")  # count attention score matmuls too
    with FlopCounterMode(display=False) as counter:
        step(0)
    result["flops_per_step"] = counter.get_total_flops()
    if args.variant == "shared":
        with FlopCounterMode(display=False) as counter:
            _limit_step(args, model, batches[0])
        result["limit_flops_per_step"] = counter.get_total_flops()
    return result


# --- the driver ----------------------------------------------------------------------------------------------


def _side(args) -> int:
    return round(args.image_tokens ** 0.5) * PATCH


def _variant_cmd(args, variant: str) -> list[str]:
    return [sys.executable, __file__, "--variant", variant, "--image-tokens", str(args.image_tokens),
            "--images", str(args.images), "--k", str(args.k), "--batch", str(args.batch), "--steps", str(args.steps),
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--threads", str(args.threads),
            "--device", args.device, "--dtype", args.dtype]


def interleaved_runs(rounds: int, variants: list[str], command: Any, rate: str) -> dict[str, list[dict[str, Any]]]:
    """Run ``command(variant)`` (a subprocess printing its result as the last JSON line) ``rounds`` times per
    variant, interleaved so that every variant sees the same drift of the machine's load."""
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in variants:
            proc = subprocess.run(command(variant), capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-4000:]}")
            runs[variant].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            logger.info("round %d %s: %.3f %s", r, variant, runs[variant][-1][rate], rate)
    return runs


def bench_main(argv: list[str] | None, parse: Any, run_variant: Any, report: Any, markdown: Any) -> None:
    """The entry point of a side-by-side benchmark: ``--variant`` runs one variant and prints its JSON; otherwise
    ``report(args)`` (with ``markdown(report)`` under "markdown" when it has "results") is printed, stamped with
    its command and written to ``--out``."""
    args = parse(argv)
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = report(args)
    if "results" in result:
        result["markdown"] = markdown(result)
    print(result.get("markdown") or json.dumps(result, indent=2))
    result["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def compare(args, variants: list[str]) -> dict[str, Any]:
    """Run every variant ``args.rounds`` times, interleaved; median pairs/s and peaks per variant, with ratios."""
    runs = interleaved_runs(args.rounds, variants, lambda v: _variant_cmd(args, v), "pairs_per_s")
    summary = {}
    for variant, rs in runs.items():
        summary[variant] = {key: statistics.median(x[key] for x in rs) if rs[0][key] is not None else None
                            for key in rs[0] if key != "variant"}
        summary[variant]["pairs_per_s_runs"] = [x["pairs_per_s"] for x in rs]
        summary[variant]["pairs_per_s_best_step"] = max(x["pairs_per_s_best_step"] for x in rs)
    base = "trl" if "trl" in summary else "plain"
    for s in summary.values():
        s[f"speed_vs_{base}"] = s["pairs_per_s"] / summary[base]["pairs_per_s"]
        s[f"peak_rss_vs_{base}"] = s["peak_rss_mib"] / summary[base]["peak_rss_mib"]
        step_mem, base_mem = (s["peak_rss_mib"] - s["rss_before_steps_mib"],
                              summary[base]["peak_rss_mib"] - summary[base]["rss_before_steps_mib"])
        s[f"step_rss_growth_vs_{base}"] = step_mem / base_mem if base_mem > 0 else None
        if s["cuda_peak_mib"] is not None:
            s[f"cuda_peak_vs_{base}"] = s["cuda_peak_mib"] / summary[base]["cuda_peak_mib"]
        if "shared" in summary:
            s["flops_vs_limit"] = s["flops_per_step"] / summary["shared"]["limit_flops_per_step"]
    return {"config": {k: v for k, v in vars(args).items() if k not in ("variant", "out")}, "results": summary}


def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    base = "trl" if "trl" in res else "plain"
    rows = ["| variant | pairs/s | x " + base + " | peak RSS MiB | x " + base + " | RSS growth in steps MiB | x "
            + base + " | CUDA peak MiB | GFLOP/step | x limit |", "|---" * 10 + "|"]
    for name, s in res.items():
        growth = s["peak_rss_mib"] - s["rss_before_steps_mib"]
        cuda = f"{s['cuda_peak_mib']:.0f}" if s["cuda_peak_mib"] is not None else "-"
        limit = f"{s['flops_vs_limit']:.2f}" if "flops_vs_limit" in s else "-"
        ratio = s[f"step_rss_growth_vs_{base}"]
        rows.append(f"| {name} | {s['pairs_per_s']:.3f} | {s[f'speed_vs_{base}']:.2f} | {s['peak_rss_mib']:.0f} | "
                    f"{s[f'peak_rss_vs_{base}']:.2f} | {growth:.0f} | {'-' if ratio is None else f'{ratio:.2f}'} | "
                    f"{cuda} | {s['flops_per_step'] / 1e9:.1f} | {limit} |")
    return "\n".join(rows)


def add_shape_args(parser: argparse.ArgumentParser) -> None:
    """The model / batch / machine options every VLM benchmark here shares (``bench_rm.py`` too)."""
    parser.add_argument("--image-tokens", type=int, default=576, help="image tokens per image (a square)")
    parser.add_argument("--images", type=int, default=1, help="images per record")
    parser.add_argument("--k", type=int, default=1, help="rejected answers per record")
    parser.add_argument("--batch", type=int, default=4, help="records per step (same for every variant)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", help="write the JSON report here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    add_shape_args(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run_variant, lambda args: compare(args, args.variants.split(",")), markdown)


if __name__ == "__main__":
    main()

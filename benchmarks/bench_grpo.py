"""GRPO / RLOO step throughput: mmalign vs TRL 1.16's GRPOTrainer on the same tiny VLM, side by side.

One RL step = sample k answers for each of G prompts (batched ``generate``, LoRA policy), score them with the
same reward, compute what the update needs, one optimizer step. Every variant uses the same LLaVA-architecture
model (``bench_dpo.build_model``: CLIP tower at 14-px patches, Llama text model, random init, local tokenizer),
the same prompts and images, the same k, the same answer length (``min_new_tokens = max_new_tokens = L`` and the
image placeholder suppressed in every variant, so no answer stops early), T = 1, LoRA r 16 on the language
model, and the same KL beta. Each variant runs in its own subprocess, interleaved over ``--rounds``.

Variants:
- ``trl``: ``GRPOTrainer.training_step`` (generation, reward, reference log-probs when beta > 0, loss with its
  k3 KL term, backward) + its optimizer's step; one generation per step (``steps_per_generation=1``);
- ``mmalign``: ``sampling.rollouts.sample_experience`` (generation, reward, reference log-probs, and the
  sampling policy's with ``--kl-placement reward``) + ``trainers.rloo.advantages`` + ``trainers.rloo.chunk_loss``
  backward + AdamW step, with the prompt KV cache (each image + prompt prefilled once per group for generation
  and encoded once per group in every log-prob pass and in the update); the KL as TRL's GRPO by default (k3,
  beta x per-token KL in the loss);
- ``mmalign_plain``: the same with the plain layout (prompt and image repeated per answer), what TRL does.
``--advantage`` rloo / grpo picks mmalign's advantage function (same cost). Speed is reported per CPU-second
of the (single-threaded) variant process -- on a machine shared with other jobs the wall clock measures the
load as much as the code -- and per wall-second; the time split (generation = the ``generate`` calls, the rest
of the rollout stage = reward and log-prob passes, and the update) is in CPU time.

    python benchmarks/bench_grpo.py --threads 1 --rounds 2 --out /tmp/bench_grpo.json
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
sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

from bench_dpo import (  # noqa: E402
    PATCH, PROMPT, _lora, bench_main, build_model, interleaved_runs,
)

logger = logging.getLogger("bench_grpo")
VARIANTS = ("trl", "mmalign", "mmalign_plain")


def _reward(answers: list[str]) -> list[float]:
    """The synthetic reward of every variant: how often the answer says "red"."""
    return [float(a.count("red")) for a in answers]


def _images(args) -> list:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    side = round(args.image_tokens ** 0.5) * PATCH
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(args.prompts)]


def _fix_lengths(model: Any, length: int) -> list[int]:
    """Every answer exactly ``length`` tokens: EOS held back until then; the image placeholder never sampled."""
    from mmalign.models.image_tokens import image_token_id

    model.generation_config.min_new_tokens = length
    return [image_token_id(model.config)]


class Clock:
    """CPU time of this process in wrapped calls, summed per label (CPU time: other jobs on a shared machine
    slow the wall clock, not the work a single-threaded step does)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, owner: Any, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def timed(*a, **kw):
            start = time.process_time()
            try:
                return inner(*a, **kw)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.process_time() - start

        setattr(owner, name, timed)


def _trl_setup(args, clock: Clock):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    model, processor = build_model(args.image_tokens, args.hidden, args.layers)
    suppress = _fix_lengths(model, args.length)
    images = _images(args)
    data = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"{PROMPT} ({i})"}]}]
                   for i in range(args.prompts)],
        "image": images,
    })
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_grpo_"), per_device_train_batch_size=args.prompts * args.k,
        num_generations=args.k, steps_per_generation=1, max_completion_length=args.length, temperature=1.0,
        beta=args.beta, learning_rate=1e-5, report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0,
        save_strategy="no", logging_strategy="no", remove_unused_columns=False, gradient_checkpointing=False,
        generation_kwargs={"min_new_tokens": args.length, "suppress_tokens": suppress},
    )
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: _reward(
        [c[0]["content"] if isinstance(c, list) else c for c in completions]), args=config, train_dataset=data,
        processing_class=processor, peft_config=_lora())
    trainer.create_optimizer()
    batches = list(trainer.get_train_dataloader())
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    clock.wrap(trainer, "_generate_single_turn", "generate")
    clock.wrap(trainer, "_generate_and_score_completions", "rollout")

    def step(i: int) -> None:
        trainer.training_step(trainer.model, batches[i % len(batches)], None)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def _mmalign_setup(args, clock: Clock, layout: str):
    from peft import get_peft_model

    from mmalign.data.schema import PreferenceRecord
    from mmalign.sampling import rollouts as rollouts_module
    from mmalign.sampling.rollouts import RolloutConfig
    from mmalign.trainers.rl_common import StepRollouts, sampling_logps_needed
    from mmalign.trainers.rloo import RLOOConfig, advantages, chunk_loss

    model, processor = build_model(args.image_tokens, args.hidden, args.layers)
    _fix_lengths(model, args.length)
    policy = get_peft_model(model, _lora())
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-5)
    images = [[img] for img in _images(args)]
    records = [PreferenceRecord(f"p{i}", ["x.png"], f"<image>\n{PROMPT} ({i})", "x", []) for i in range(args.prompts)]
    cfg = RLOOConfig(advantage=args.advantage, forward=layout)
    cfg.rollout = RolloutConfig(k=args.k, temperature=1.0, max_new_tokens=args.length, batch_size=args.prompts * args.k)
    cfg.kl.beta, cfg.kl.estimator, cfg.kl.placement, cfg.reward.normalize = args.beta, "k3", args.kl_placement, False
    clock.wrap(rollouts_module, "generate_ids", "generate")

    def reward(groups):
        return [_reward(g.answers) for g in groups]

    def step(i: int) -> None:
        start = time.process_time()
        experience = rollouts_module.sample_experience(
            policy, None, processor, records, images, cfg.rollout, reward, seed=i, step=i, layout=layout, device="cpu",
            policy_logps=sampling_logps_needed(cfg))
        rollouts = StepRollouts(experience, records, images)
        _, _, adv = advantages(cfg, rollouts, None)
        clock.seconds["rollout"] = clock.seconds.get("rollout", 0.0) + time.process_time() - start
        loss, _ = chunk_loss(cfg, policy, processor, rollouts, adv, torch.arange(len(adv)), "cpu")
        (loss / len(adv)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def run_variant(args) -> dict[str, Any]:
    """One variant: one warm-up step, then ``args.steps`` timed steps; the time split of the timed steps."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    clock = Clock()
    step = _trl_setup(args, clock) if args.variant == "trl" else _mmalign_setup(
        args, clock, "plain" if args.variant == "mmalign_plain" else "prefix_cache")
    step(args.steps)  # warm-up
    clock.seconds.clear()
    wall, cpu = [], []
    for i in range(args.steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        step(i)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    total = sum(cpu)
    rollout = clock.seconds.get("rollout", 0.0)
    generate = clock.seconds.get("generate", 0.0)
    return {"variant": args.variant, "steps_per_s": args.steps / sum(wall), "steps_per_cpu_s": args.steps / total,
            "best_step_s": min(wall), "generate_share": generate / total,
            "other_rollout_share": (rollout - generate) / total, "update_share": (total - rollout) / total}


def _variant_cmd(args, variant: str) -> list[str]:
    return [sys.executable, __file__, "--variant", variant, "--prompts", str(args.prompts), "--k", str(args.k),
            "--length", str(args.length), "--image-tokens", str(args.image_tokens), "--hidden", str(args.hidden),
            "--layers", str(args.layers), "--beta", str(args.beta), "--advantage", args.advantage,
            "--kl-placement", args.kl_placement,
            "--steps", str(args.steps), "--threads", str(args.threads)]


def compare(args, variants: list[str]) -> dict[str, Any]:
    """Every variant ``args.rounds`` times, interleaved; medians per variant and the speed ratio to TRL."""
    runs = interleaved_runs(args.rounds, variants, lambda v: _variant_cmd(args, v), "steps_per_s")
    summary = {v: {k: statistics.median(x[k] for x in rs) for k in rs[0] if k != "variant"} | {
        "steps_per_s_runs": [x["steps_per_s"] for x in rs]} for v, rs in runs.items()}
    base = "trl" if "trl" in summary else variants[0]
    for s in summary.values():
        s[f"speed_vs_{base}"] = s["steps_per_s"] / summary[base]["steps_per_s"]
        s[f"cpu_speed_vs_{base}"] = s["steps_per_cpu_s"] / summary[base]["steps_per_cpu_s"]
    return {"config": {k: v for k, v in vars(args).items() if k not in ("variant", "out")}, "results": summary}


def markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    base = "trl" if "trl" in res else next(iter(res))
    rows = [f"| variant | steps per CPU-s | x {base} | steps/s (wall) | x {base} | generation | other rollout "
            "(reward, log-probs) | update |", "|---" * 8 + "|"]
    for name, s in res.items():
        rows.append(f"| {name} | {s['steps_per_cpu_s']:.3f} | {s[f'cpu_speed_vs_{base}']:.2f} | "
                    f"{s['steps_per_s']:.3f} | {s[f'speed_vs_{base}']:.2f} | {s['generate_share']:.0%} | "
                    f"{s['other_rollout_share']:.0%} | {s['update_share']:.0%} |")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process (internal)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step (G)")
    parser.add_argument("--k", type=int, default=4, help="answers per prompt")
    parser.add_argument("--length", type=int, default=32, help="tokens per answer (every answer exactly this long)")
    parser.add_argument("--image-tokens", type=int, default=144, help="image tokens per image (a square)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.4, help="KL beta (Apple's RLOO: 0.4; 0 = no reference pass)")
    parser.add_argument("--advantage", choices=("rloo", "grpo"), default="grpo")
    parser.add_argument("--kl-placement", choices=("loss", "reward"), default="loss",
                        help="mmalign's KL: in the loss as TRL's GRPO (k3, no sampling-policy pass when on-policy) or "
                             "in the reward as TRL's RLOO (one more log-prob pass)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved repetitions of every variant")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="write the JSON report here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    bench_main(argv, parse_args, run_variant, lambda args: compare(args, args.variants.split(",")), markdown)


if __name__ == "__main__":
    main()

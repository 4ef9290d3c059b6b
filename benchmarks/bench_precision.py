"""float32 against bf16 autocast for SFT steps of the lab model on this machine, side by side in one process.

    python benchmarks/bench_precision.py [--steps 20] [--rounds 3] [--batch 32] [--threads 2]

Builds the lab LLaVA (``mmalign.lab.model``, 128 px, 256 image tokens) and one batch of lab-like records
(random scenes, caption answers), then alternates rounds of ``--steps`` forward + backward + AdamW steps in
float32 and under bf16 autocast (``accelerate``'s CPU autocast), so both see the same machine load. Prints the
median seconds per step of each and the ratio, and whether the CPU reports native bf16
(``trainers.common.cpu_has_native_bf16``: the rule ``run.mixed_precision: auto`` follows).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.lab.texts import CAPTION_PROMPT, caption_order, caption
from mmalign.lab.world import WorldConfig, render, sample_scene
from mmalign.trainers.common import cpu_has_native_bf16


def batch(processor, n: int) -> dict[str, torch.Tensor]:
    world, rng = WorldConfig(), random.Random(0)
    scenes = [sample_scene(rng, world, 0.9) for _ in range(n)]
    texts = [f"USER: {CAPTION_PROMPT} ASSISTANT: {caption(caption_order(s.names, world.partner_of))}</s>"
             for s in scenes]
    out = processor(images=[render(s, world.image_size) for s in scenes], text=texts, padding=True,
                    return_tensors="pt")
    out["labels"] = out["input_ids"].masked_fill(out["attention_mask"] == 0, -100)
    return dict(out)


def seconds_per_step(model, inputs, optimizer, steps: int, bf16: bool) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = build_lab_model(LabModelConfig())
    inputs = batch(processor, args.batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    results = {"float32": [], "bf16 autocast": []}
    for _ in range(args.rounds):
        results["float32"].append(seconds_per_step(model, inputs, optimizer, args.steps, bf16=False))
        results["bf16 autocast"].append(seconds_per_step(model, inputs, optimizer, args.steps, bf16=True))
    fp32, bf16 = (statistics.median(v) for v in results.values())
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; batch {args.batch}, sequence "
          f"{inputs['input_ids'].shape[1]}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps")
    for name, values in results.items():
        print(f"{name:>14}: median {statistics.median(values):.3f} s/step (rounds: "
              + ", ".join(f"{v:.3f}" for v in values) + ")")
    print(f"float32 / bf16 time ratio: {fp32 / bf16:.2f} (> 1: bf16 autocast is faster here)")


if __name__ == "__main__":
    main()

"""Multi-turn SFT records against single-turn ones on the lab model, side by side in one process.

    python benchmarks/bench_sft_multiturn.py [--images 4] [--steps 3] [--rounds 3] [--threads 1]

Builds the lab LLaVA (``mmalign.lab.model``, 128 px, 256 image tokens) and ``--images`` lab scenes with 4 yes/no
questions each (``mmalign.lab.splits.sft_examples``), then times full SFT steps (``collate_turns`` + forward
with logits at answer positions + backward + AdamW step, as ``trainers.sft`` runs them) of three batches:
- ``4-turn``: one 4-turn record per image (``questions_per_turn_record: 4``): every answer, one image encoding;
- ``single x4``: the same 4 questions as 4 single-turn records per image (the same answers, 4 image encodings);
- ``single x1``: one single-turn record per image (as many rows as ``4-turn``, a quarter of the answers).
Variants alternate over rounds so machine load hits them alike. Prints the median seconds per step, steps/s
and examples/s (yes/no answers trained per second) of each and the ratios to ``single x4``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from mmalign.data.chat import earlier_answers
from mmalign.data.collate import collate_turns
from mmalign.data.schema import PreferenceRecord
from mmalign.lab.model import LabModelConfig, build_lab_model
from mmalign.lab.splits import conversations, sft_examples
from mmalign.lab.world import WorldConfig, render, sample_scene
from mmalign.models.logprobs import answer_token_logps

QUESTIONS = 4


def batches(n_images: int) -> dict[str, tuple[list[PreferenceRecord], list[list]]]:
    """(records, images) of each variant for ``n_images`` scenes with ``QUESTIONS`` yes/no questions each."""
    world, rng = WorldConfig(), random.Random(0)
    out: dict[str, tuple[list, list]] = {"4-turn": ([], []), "single x4": ([], []), "single x1": ([], [])}
    for i in range(n_images):
        scene = sample_scene(rng, world, 0.9)
        image = [render(scene, world.image_size)]
        questions = sft_examples(scene, world, rng, QUESTIONS, 0.3, 0.5)[1:]
        ((messages, last),) = conversations(questions, QUESTIONS)
        rows = {"4-turn": [(messages, last)], "single x4": questions, "single x1": questions[:1]}
        for name, pairs in rows.items():
            for j, (prompt, answer) in enumerate(pairs):
                out[name][0].append(PreferenceRecord(f"{i}-{j}", ["x.png"], prompt, answer, []))
                out[name][1].append(image)
    return out


def seconds_per_step(model, processor, records, images, optimizer, steps: int) -> tuple[float, int]:
    """Median seconds of the timed SFT steps (the first of each round warms up) and the answers per step."""
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        batch = collate_turns(processor, records, images)
        token_logps, mask = answer_token_logps(model, batch)
        (-(token_logps * mask).sum() / mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), sum(len(earlier_answers(r.prompt)) + 1 for r in records)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=4, help="images per step (each with 4 yes/no questions)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, processor = build_lab_model(LabModelConfig())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    variants = batches(args.images)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    answers: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, (records, images) in variants.items():
            step_s, answers[name] = seconds_per_step(model, processor, records, images, optimizer, args.steps)
            seconds[name].append(step_s)
    print(f"lab model 128 px (256 image tokens), {args.images} images x {QUESTIONS} yes/no questions, "
          f"{args.threads} thread(s), {args.rounds} rounds of {args.steps} timed steps")
    base = statistics.median(seconds["single x4"])
    for name, values in seconds.items():
        step_s = statistics.median(values)
        rows = len(variants[name][0])
        print(f"{name:>10}: {rows:3d} rows, {answers[name]:3d} answers/step, median {step_s:.3f} s/step, "
              f"{1 / step_s:.3f} steps/s, {answers[name] / step_s:.2f} examples/s; examples/s vs single x4: "
              f"{answers[name] / step_s / (answers['single x4'] / base):.2f} (rounds: "
              + ", ".join(f"{v:.3f}" for v in values) + ")")


if __name__ == "__main__":
    main()

"""Model-running scorers: POPE by generation or by answer likelihood, and caption generation.

Each returns one record per item (prompt, answer, parsed answer, truth) for the metrics of ``pope`` and
``chair`` to consume.
- ``score_pope_generate``: greedy generation through ``mmalign.sampling.generate.generate``, then parsing.
- ``score_pope_likelihood``: one forward pass per batch over prompt + every candidate answer (e.g. "Yes."
  and "No."); the candidate with the highest summed answer log-prob (tokens of ``answer_ids``: text +
  EOS) wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmalign.data.collate import collate_preference
from mmalign.data.schema import PreferenceRecord
from mmalign.evaluation.pope import is_unclear, parse_yes_no
from mmalign.models.logprobs import answer_token_logps, sequence_logps
from mmalign.sampling.generate import GenerationParams, generate


def _record(item: dict[str, Any], answer: str, parsed: str, **extra: Any) -> dict[str, Any]:
    """The per-sample record; ``stratum`` is null for items without one (an optional field of POPE files)."""
    return {"id": item["id"], "split": item["split"], "object": item["object"], "stratum": item.get("stratum"),
            "image": item["image"], "prompt": item["question"], "answer": answer, "parsed": parsed,
            "truth": item["label"], **extra}


def score_pope_generate(model: Any, processor: Any, items: Sequence[dict[str, Any]],
                        images: Sequence[Image.Image], *, max_new_tokens: int = 16, batch_size: int = 16,
                        seed: int = 0) -> list[dict[str, Any]]:
    """Greedy answers to every POPE question, parsed (``unclear``: neither yes nor no, ``pope.is_unclear``);
    ``images[i]`` is the image of ``items[i]``."""
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    answers = generate(model, processor, [it["question"] for it in items], [[im] for im in images], params,
                       seed=seed, batch_size=batch_size)
    return [_record(it, ans, parse_yes_no(ans), unclear=is_unclear(ans)) for it, ans in zip(items, answers)]


@torch.no_grad()
def score_pope_likelihood(model: Any, processor: Any, items: Sequence[dict[str, Any]],
                          images: Sequence[Image.Image], *, candidates: Sequence[str] = ("Yes.", "No."),
                          batch_size: int = 16) -> list[dict[str, Any]]:
    """Pick, per question, the candidate answer with the highest summed log-prob under ``model``.

    Each batch of B questions becomes ``B * C`` rows, C = ``len(candidates)`` (prompt + candidate tokens
    of ``answer_ids``: text + EOS), scored in one forward pass that builds logits only at answer
    positions. Candidates are mapped to yes/no by ``parse_yes_no``; a yes and a no answer must be among them.
    Each record carries ``scores``: candidate -> summed log-prob.
    """
    labels = [parse_yes_no(c) for c in candidates]
    if set(labels) != {"yes", "no"}:
        raise ValueError(f"POPE candidates {list(candidates)} must include a yes and a no answer")
    records = []
    for start in range(0, len(items), batch_size):
        batch_items = items[start:start + batch_size]
        # One preference record per question: candidate 0 as "chosen", the rest as "rejected", so the
        # collated rows are (question, candidate) pairs placed by row_record / row_answer.
        rows = [PreferenceRecord(id=it["id"], images=[it["image"]], prompt=it["question"],
                                 chosen=candidates[0], rejected=list(candidates[1:])) for it in batch_items]
        batch = collate_preference(processor, rows, [[im] for im in images[start:start + batch_size]])
        # Float inputs (pixel values) follow the model's dtype, as in ``generate``.
        batch = {k: v.to(model.device, dtype=model.dtype) if v.is_floating_point() else v.to(model.device)
                 for k, v in batch.items()}
        logps = sequence_logps(*answer_token_logps(model, batch))  # [B * C]
        scores = logps.new_zeros(len(rows), len(candidates))
        scores[batch["row_record"], batch["row_answer"]] = logps
        for item, row in zip(batch_items, scores.cpu()):
            best = int(row.argmax())
            records.append(_record(item, candidates[best], labels[best],
                                   scores={c: float(v) for c, v in zip(candidates, row)}))
    return records


def generate_captions(model: Any, processor: Any, items: Sequence[dict[str, Any]], images: Sequence[Image.Image],
                      *, max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0) -> list[str]:
    """Greedy caption of every item (``{"prompt", ...}``); ``images[i]`` is the image of ``items[i]``."""
    params = GenerationParams(max_new_tokens=max_new_tokens, temperature=0.0)
    return generate(model, processor, [it["prompt"] for it in items], [[im] for im in images], params,
                    seed=seed, batch_size=batch_size)

"""LLaVA-Bench-in-the-Wild relative score (Liu et al. 2023; methods.md 5.4).

Files as the benchmark ships them: ``questions.jsonl`` (``question_id``, ``image``, ``text``, ``category``),
``context.jsonl`` (``id``/``image`` and ``caption``: the text the judge sees instead of pixels) and
``answers_gpt4.jsonl`` (``question_id``, ``text``: the reference answer). The judge compares the reference
(Assistant 1) with the model's answer (Assistant 2) and writes the two 1-10 scores on its first line; a reply
whose first line does not hold two numbers counts as unparsed and is left out of the scores (the reference
script stores -1 for it). The relative score is sum(model) / sum(reference) x 100, overall and per category
(conv / detail / complex); rules come from a ``rule.json`` keyed ``llava_bench_<category>`` (the official
file) or the shipped one's ``default``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.evaluation.stats import ratio

DEFAULT_RULES = Path(__file__).parent / "prompts" / "llava_bench_rule.json"
_NUMBER = re.compile(r"^\s*(\d+(?:\.\d+)?)[\s,]+(\d+(?:\.\d+)?)\s*$")


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_llava_bench(folder: str | Path) -> list[dict[str, Any]]:
    """Questions with their context caption and reference answer from the benchmark folder."""
    folder = Path(folder)
    captions = {row["image"]: row["caption"] for row in _jsonl(folder / "context.jsonl")}
    references = {row["question_id"]: row["text"] for row in _jsonl(folder / "answers_gpt4.jsonl")}
    items = []
    for row in _jsonl(folder / "questions.jsonl"):
        qid = row["question_id"]
        if qid not in references or row["image"] not in captions:
            raise ValueError(f"{folder}: question {qid} has no reference answer or no context caption")
        items.append({"id": str(qid), "image": row["image"], "prompt": row["text"], "category": row["category"],
                      "caption": captions[row["image"]], "reference": references[qid]})
    if not items:
        raise ValueError(f"{folder}/questions.jsonl: no questions")
    return items


def load_rules(path: str | Path) -> dict[str, Any]:
    rules = json.loads(Path(path).read_text(encoding="utf-8"))
    shipped = json.loads(DEFAULT_RULES.read_text(encoding="utf-8"))
    return {"system": shipped["system"], **rules}


def judge_request(item: dict[str, Any], answer: str, rules: dict[str, Any]) -> list[dict[str, Any]]:
    """System + user messages: context, question, reference as Assistant 1, the model as Assistant 2, rule."""
    rule = rules.get(f"llava_bench_{item['category']}") or rules["default"]
    role = rule["role"]
    text = (f"[Context]\n{item['caption']}\n\n[Question]\n{item['prompt']}\n\n"
            f"[{role} 1]\n{item['reference']}\n\n[End of {role} 1]\n\n"
            f"[{role} 2]\n{answer}\n\n[End of {role} 2]\n\n[System]\n{rule['prompt']}\n\n")
    return [{"role": "system", "content": rules["system"]}, {"role": "user", "content": text}]


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(reference score, model score) from the reply's first line, or None."""
    match = _NUMBER.match(reply.strip().split("\n")[0]) if reply.strip() else None
    return (float(match.group(1)), float(match.group(2))) if match else None


def llava_bench_record(item: dict[str, Any], answer: str, reply: str) -> dict[str, Any]:
    scores = parse_scores(reply)
    return {"id": item["id"], "category": item["category"], "image": item["image"], "prompt": item["prompt"],
            "answer": answer, "judge_reply": reply, "reference_score": scores[0] if scores else None,
            "model_score": scores[1] if scores else None}


def llava_bench_columns(records: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    parsed = np.array([r["model_score"] is not None for r in records], dtype=float)
    return {"model": np.array([r["model_score"] or 0.0 for r in records], dtype=float),
            "reference": np.array([r["reference_score"] or 0.0 for r in records], dtype=float),
            "parsed": parsed, "questions": np.ones(len(records))}


LLAVA_BENCH_METRICS = {
    "relative_score": lambda s: 100.0 * ratio(s["model"], s["reference"]),
    "model_score": lambda s: ratio(s["model"], s["parsed"]),
    "reference_score": lambda s: ratio(s["reference"], s["parsed"]),
    "unparsed_rate": lambda s: 1.0 - ratio(s["parsed"], s["questions"]),
}

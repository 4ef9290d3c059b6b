"""POPE (Li et al. 2023; methods.md 5.1): yes/no object probing, answer parsing and metrics.

Parsing is LLaVA's ``llava/eval/eval_pope.py``: keep the text before the first '.', drop commas, split on
single spaces; if any word is 'No', 'no' or 'not' the answer is "no", otherwise "yes".
Metrics (positive = "yes"), per split: accuracy (TP+TN)/N, precision TP/(TP+FP), recall TP/(TP+FN),
F1 = 2PR/(P+R) = 2TP/(2TP+FP+FN), yes-ratio = #predicted yes / N. The yes-ratio is computed from the
*predictions*; lmms-eval's aggregate counts ground-truth yes instead (methods.md 6.9).
The model-running scorers that produce the parsed answers are in ``mmalign.evaluation.scoring``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmalign.evaluation.stats import ratio

_NO_WORDS = ("No", "no", "not")


def parse_yes_no(answer: str) -> str:
    """``"Yes, there is."`` -> "yes"; ``"No."`` -> "no"; ``"not sure"`` -> "no" (LLaVA eval_pope.py)."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if any(w in words for w in _NO_WORDS) else "yes"


def pope_columns(parsed: Sequence[str], truth: Sequence[str]) -> dict[str, np.ndarray]:
    """Confusion indicators per sample, each of shape ``[n]``; every sample is in exactly one cell."""
    if len(parsed) != len(truth):
        raise ValueError(f"{len(parsed)} predictions for {len(truth)} labels")
    pred = np.array([p == "yes" for p in parsed])
    gold = np.array([t == "yes" for t in truth])
    return {
        "tp": (pred & gold).astype(float), "fp": (pred & ~gold).astype(float),
        "fn": (~pred & gold).astype(float), "tn": (~pred & ~gold).astype(float),
    }


POPE_METRICS = {
    "accuracy": lambda s: ratio(s["tp"] + s["tn"], s["tp"] + s["fp"] + s["fn"] + s["tn"]),
    "precision": lambda s: ratio(s["tp"], s["tp"] + s["fp"]),
    "recall": lambda s: ratio(s["tp"], s["tp"] + s["fn"]),
    "f1": lambda s: ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"]),
    "yes_ratio": lambda s: ratio(s["tp"] + s["fp"], s["tp"] + s["fp"] + s["fn"] + s["tn"]),
}


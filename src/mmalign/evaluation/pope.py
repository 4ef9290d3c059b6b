"""POPE (Li et al. 2023; methods.md 5.1): yes/no object probing, answer parsing and metrics.

Parsing is LLaVA's ``llava/eval/eval_pope.py``: keep the text before the first '.', drop commas, split on
single spaces; if any word is 'No', 'no' or 'not' the answer is "no", otherwise "yes".
Metrics (positive = "yes"), per split: accuracy (TP+TN)/N, precision TP/(TP+FP), recall TP/(TP+FN),
F1 = 2PR/(P+R) = 2TP/(2TP+FP+FN), yes-ratio = #predicted yes / N. The yes-ratio is computed from the
*predictions*; lmms-eval's aggregate counts ground-truth yes instead (methods.md 6.9).
F1 and accuracy mix two things an alignment run can trade against each other, so they are never read alone:
the false-positive rate FP/(FP+TN) ("yes" to absent objects: hallucination) and the true-positive rate
TP/(TP+FN) ("yes" to present objects: coverage; POPE's recall) are reported side by side. A model that
says "yes" more often to everything raises both, and can raise F1 while hallucinating more.
The model-running scorers that produce the parsed answers are in ``mmalign.evaluation.scoring``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mmalign.evaluation.stats import ratio

_NO_WORDS = ("No", "no", "not")
_YES_WORDS = ("Yes", "yes")


def _first_sentence_words(answer: str) -> list[str]:
    text = answer.split(".")[0] if "." in answer else answer
    return text.replace(",", "").split(" ")


def parse_yes_no(answer: str) -> str:
    """``"Yes, there is."`` -> "yes"; ``"No."`` -> "no"; ``"not sure"`` -> "no" (LLaVA eval_pope.py)."""
    return "no" if any(w in _first_sentence_words(answer) for w in _NO_WORDS) else "yes"


def is_unclear(answer: str) -> bool:
    """True when the first sentence holds neither a yes nor a no word: LLaVA's parser counts such an answer
    ("There is a red circle.") as "yes", so the share of them is reported beside the metrics."""
    words = _first_sentence_words(answer)
    return not any(w in words for w in _NO_WORDS + _YES_WORDS)


def pope_columns(parsed: Sequence[str], truth: Sequence[str],
                 unclear: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """Confusion indicators per sample, each of shape ``[n]``; every sample is in exactly one cell.
    ``unclear`` flags answers that were neither yes nor no (``is_unclear``; all False for a likelihood
    scorer, which only picks among its candidates)."""
    if len(parsed) != len(truth) or (unclear is not None and len(unclear) != len(truth)):
        raise ValueError(f"{len(parsed)} predictions for {len(truth)} labels")
    pred = np.array([p == "yes" for p in parsed], dtype=bool)
    gold = np.array([t == "yes" for t in truth], dtype=bool)
    return {
        "tp": (pred & gold).astype(float), "fp": (pred & ~gold).astype(float),
        "fn": (~pred & gold).astype(float), "tn": (~pred & ~gold).astype(float),
        "unclear": np.zeros(len(truth)) if unclear is None else np.array(unclear, dtype=float),
    }


POPE_METRICS = {
    "accuracy": lambda s: ratio(s["tp"] + s["tn"], s["tp"] + s["fp"] + s["fn"] + s["tn"]),
    "precision": lambda s: ratio(s["tp"], s["tp"] + s["fp"]),
    "recall": lambda s: ratio(s["tp"], s["tp"] + s["fn"]),
    "f1": lambda s: ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"]),
    "yes_ratio": lambda s: ratio(s["tp"] + s["fp"], s["tp"] + s["fp"] + s["fn"] + s["tn"]),
    "fp_rate": lambda s: ratio(s["fp"], s["fp"] + s["tn"]),
    "tp_rate": lambda s: ratio(s["tp"], s["tp"] + s["fn"]),
    "unclear_rate": lambda s: ratio(s["unclear"], s["tp"] + s["fp"] + s["fn"] + s["tn"]),
}
# Within one stratum (one kind of question) only the share answered "yes" is defined for every stratum.
YES_RATE_METRICS = {"yes_rate": lambda s: ratio(s["tp"] + s["fp"], s["tp"] + s["fp"] + s["fn"] + s["tn"])}


"""A verdict per run against the base that a shift in answer bias or in caption length cannot game.

F1, accuracy and the partner-vs-random gap can all improve while a model hallucinates more: saying "yes"
more often to every question raises POPE's F1 on a balanced split and shrinks the gap, and naming fewer
objects lowers CHAIR_i. So a run is called **less hallucination** only when

- a hallucination measure falls beyond its paired 95 % interval (POPE "yes" to absent objects, hallucinated
  mentions per caption, CHAIR_i) and none rises beyond its interval, and
- coverage holds: POPE "yes" to present objects and caption recall each fall by at most
  ``COVERAGE_TOLERANCE`` (2 points) in point estimate.

Otherwise the verdict says what happened instead (an answer-bias shift toward "yes" or "no", fewer
mentions, more hallucination, mixed, coverage lost with hallucination level,
no clear change). Side effects (yes-ratio, TP rate, recall, caption
length, mentions per caption) are listed whatever the verdict, as is the planted bias (absent-partner
"yes" rate, partner named in captions). Everything is read from the paired tests of ``suite.compare``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mmalign.evaluation.stats import PairedResult

COVERAGE_TOLERANCE = 0.02
# An answer-bias shift: the share of "yes" answers moves by more than this while FP and TP rates move together.
YES_SHIFT = 0.05

HALLUCINATION = {
    "pope/all/fp_rate": "POPE 'yes' to absent objects",
    "chair/hallucinated_per_caption": "hallucinated mentions per caption",
    "chair/chair_i": "CHAIR_i",
}
COVERAGE = {"pope/all/tp_rate": "POPE 'yes' to present objects", "chair/recall": "caption recall"}
BIAS = {"pope_bias/yes_rate_partner": "POPE 'yes' to the absent partner",
        "cooccur/partner_rate": "captions naming the absent partner"}
SIDE_EFFECTS = {
    "pope/all/yes_ratio": "POPE yes-ratio", "pope/all/tp_rate": "POPE TP rate", "chair/recall": "recall",
    "chair/words_per_caption": "words per caption", "chair/mentions_per_caption": "mentions per caption",
}


@dataclass(frozen=True)
class Verdict:
    """``label``: the one-line verdict; ``reasons``: the measured changes behind it; ``side_effects`` and
    ``bias``: every side-effect and planted-bias metric's change (run - base) with its interval."""

    label: str
    reasons: list[str]
    side_effects: list[str]
    bias: list[str]

    @property
    def less_hallucination(self) -> bool:
        return self.label == "less hallucination"


def _fell(t: PairedResult) -> bool:
    return t.ci_high < 0


def _rose(t: PairedResult) -> bool:
    return t.ci_low > 0


def describe(name: str, t: PairedResult) -> str:
    """``"recall -0.080 [-0.100, -0.060] * (0.520 -> 0.440)"``: difference, its paired interval (``*``: the
    interval excludes 0), the base and run values."""
    mark = " *" if _fell(t) or _rose(t) else ""
    return f"{name} {t.diff:+.3f} [{t.ci_low:+.3f}, {t.ci_high:+.3f}]{mark} ({t.value_b:.3f} -> {t.value_a:.3f})"


def _present(tests: Mapping[str, PairedResult], keys: Mapping[str, str]) -> dict[str, PairedResult]:
    return {k: tests[k] for k in keys if k in tests}


def _label(tests: Mapping[str, PairedResult], down: list[str], up: list[str], dropped: list[str]) -> str:
    fp, tp, yes = tests.get("pope/all/fp_rate"), tests.get("pope/all/tp_rate"), tests.get("pope/all/yes_ratio")
    if fp and tp and yes and abs(yes.diff) > YES_SHIFT:
        if _rose(fp) and _rose(tp):
            return "answer-bias shift: more 'yes' to everything"
        if _fell(fp) and tp.diff < -COVERAGE_TOLERANCE:
            return "answer-bias shift: more 'no' to everything"
    if down and up:
        return "mixed"
    if up:
        return "more hallucination"
    if down and dropped:
        recall = tests.get("chair/recall")
        if "chair/recall" in dropped and recall is not None:
            return f"fewer mentions: recall {100 * recall.diff:+.0f} points"
        return "less hallucination at a coverage cost"
    if down:
        return "less hallucination"
    if dropped:
        return "coverage lost, hallucination level"
    return "no clear change"


def verdict(tests: Mapping[str, PairedResult], tolerance: float = COVERAGE_TOLERANCE) -> Verdict:
    """The verdict of one run from its paired tests against the base (``Comparison.tests[run]``)."""
    hallucination = _present(tests, HALLUCINATION)
    coverage = _present(tests, COVERAGE)
    down = [k for k, t in hallucination.items() if _fell(t)]
    up = [k for k, t in hallucination.items() if _rose(t)]
    dropped = [k for k, t in coverage.items() if t.diff < -tolerance]
    label = _label(tests, down, up, dropped)
    reasons = [describe(HALLUCINATION[k], hallucination[k]) for k in down + up]
    reasons += [describe(COVERAGE[k], coverage[k]) + f" (falls more than {tolerance:.2f})" for k in dropped]
    side = [describe(name, tests[k]) for k, name in SIDE_EFFECTS.items() if k in tests]
    bias = [describe(name, tests[k]) for k, name in BIAS.items() if k in tests]
    return Verdict(label, reasons, side, bias)
